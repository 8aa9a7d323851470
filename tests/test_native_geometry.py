"""cuda/gna_geometry.h (the native port) agrees with jax_gna.geometry tile for tile.

The C++ side is reached through the extension's `axis_tiling`, `windows` and
`tile_mask_word` functions, which call gna::AxisTiling, gna::window_bounds and
gna::TileBits exactly as the handlers and kernels do.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from jax_gna import geometry, native

pytestmark = pytest.mark.skipif(
    native.extension_unavailable() is not None,
    reason=f"the native extension is not built: {native.extension_unavailable()}")


def _random_axes(count: int, seed: int):
    """(length, kernel, stride, causal, q_tile, kv_tile) over group axes."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        length = int(rng.integers(2, 200)) if rng.random() < 0.7 else int(rng.integers(2, 12))
        kernel = int(rng.integers(2, length + 1))
        stride = int(rng.integers(1, kernel + 1)) if rng.random() < 0.5 else 1
        causal = bool(rng.random() < 0.35)
        q_tile = int(rng.choice([1, 2, 3, 4, 7, 8, 16, 64, 128, 300]))
        kv_tile = int(rng.choice([1, 2, 4, 5, 8, 16, 64, 256]))
        out.append((length, kernel, stride, causal, q_tile, kv_tile))
    return out


_AXES = _random_axes(1500, seed=2026) + [
    (7, 7, 1, False, 4, 4), (7, 7, 7, True, 2, 3), (12, 4, 4, False, 4, 4),
    (13, 4, 4, True, 8, 2), (2, 2, 1, False, 1, 1), (2, 2, 2, True, 128, 64),
    (1000, 33, 5, True, 128, 64), (1000, 1000, 1, False, 128, 64),
]


def test_windows_agree():
    for length, kernel, stride, causal, _, _ in _AXES:
        start, end = native._ext.windows(length, kernel, stride, causal)
        ii = np.arange(length)
        py_start, py_end = geometry.window_bounds(ii, length, kernel, stride, causal)
        np.testing.assert_array_equal(start, py_start, err_msg=str((length, kernel, stride,
                                                                    causal)))
        np.testing.assert_array_equal(end, py_end)


def _framed_axes(count: int, seed: int):
    """(params, frame) pairs: random group axes with random valid frames.

    The Q frame is a random sub-range of ``[0, length)``; the KV frame covers the union of
    its windows plus random padding on both sides (so it may start below 0 or end past the
    axis).
    """
    rng = np.random.default_rng(seed)
    out = []
    for params in _random_axes(count, seed):
        length, kernel, stride, causal = params[:4]
        q_offset = int(rng.integers(0, length))
        q_len = int(rng.integers(1, length - q_offset + 1))
        start, _ = geometry.window_bounds(q_offset, length, kernel, stride, causal)
        _, end = geometry.window_bounds(q_offset + q_len - 1, length, kernel, stride, causal)
        pad_lo = int(rng.integers(0, 6)) if rng.random() < 0.6 else 0
        pad_hi = int(rng.integers(0, 6)) if rng.random() < 0.6 else 0
        kv_offset = int(start) - pad_lo
        kv_len = int(end) + pad_hi - kv_offset
        out.append((params, dict(q_offset=q_offset, q_len=q_len, kv_offset=kv_offset,
                                 kv_len=kv_len)))
    return out


_FRAMED = _framed_axes(1500, seed=77) + [
    ((7, 7, 1, False, 4, 4), dict(q_offset=3, q_len=2, kv_offset=0, kv_len=7)),
    ((20, 5, 1, False, 4, 4), dict(q_offset=8, q_len=4, kv_offset=6, kv_len=8)),
    ((20, 5, 1, True, 3, 2), dict(q_offset=0, q_len=5, kv_offset=-3, kv_len=9)),
    ((20, 5, 2, False, 8, 8), dict(q_offset=12, q_len=8, kv_offset=10, kv_len=15)),
]


def _assert_tilings_agree(cpp: dict, py: geometry.AxisTiling, where: str) -> tuple[int, int]:
    """Asserts that the extension's tiling equals Python's; returns (#full, #partial) pairs."""
    np.testing.assert_array_equal(cpp["kv_lo"], py.kv_lo, err_msg=where)
    np.testing.assert_array_equal(cpp["kv_hi"], py.kv_hi, err_msg=where)
    full = np.asarray(cpp["full"], dtype=bool).reshape(py.full.shape)
    np.testing.assert_array_equal(full, py.full, err_msg=where)
    # q ranges: equal where non-empty; an unseen KV tile is an empty range on both sides.
    cpp_q = np.stack([cpp["q_lo"], cpp["q_hi"]], axis=1).reshape(-1, 2)
    py_q = np.stack([py.q_lo, py.q_hi], axis=1)
    empty = py_q[:, 0] >= py_q[:, 1]
    np.testing.assert_array_equal(cpp_q[:, 0] >= cpp_q[:, 1], empty, err_msg=where)
    np.testing.assert_array_equal(cpp_q[~empty], py_q[~empty], err_msg=where)
    # The C++ ranges reproduce Python's visibility matrix.
    kt = np.arange(py.visible.shape[1])
    visible = ((kt[None, :] >= np.asarray(cpp["kv_lo"])[:, None])
               & (kt[None, :] < np.asarray(cpp["kv_hi"])[:, None]))
    np.testing.assert_array_equal(visible, py.visible, err_msg=where)
    # full_q_range (the dK/dV kernel's per-CTA mask-free range) is exactly Python's full
    # column per KV tile.
    qt = np.arange(py.full.shape[0])
    full_q = ((qt[:, None] >= np.asarray(cpp["full_q_lo"])[None, :])
              & (qt[:, None] < np.asarray(cpp["full_q_hi"])[None, :]))
    np.testing.assert_array_equal(full_q, py.full, err_msg=where)
    return int(py.full.sum()), int((py.visible & ~py.full).sum())


def test_axis_tilings_agree_tile_for_tile():
    checked_partial = checked_full = 0
    for params in _AXES:
        where = f"(length, kernel, stride, causal, q_tile, kv_tile) = {params}"
        f, p = _assert_tilings_agree(native._ext.axis_tiling(*params),
                                     geometry.axis_tiling(*params), where)
        checked_full += f
        checked_partial += p
    assert checked_full > 1000 and checked_partial > 1000  # both tile kinds are exercised


def test_framed_tilings_agree_tile_for_tile():
    checked_partial = checked_full = padded = 0
    for params, frame in _FRAMED:
        where = f"(length, kernel, stride, causal, q_tile, kv_tile) = {params}, {frame}"
        f, p = _assert_tilings_agree(native._ext.axis_tiling(*params, **frame),
                                     geometry.axis_tiling(*params, **frame), where)
        checked_full += f
        checked_partial += p
        padded += frame["kv_offset"] < 0 or frame["kv_offset"] + frame["kv_len"] > params[0]
    assert checked_full > 300 and checked_partial > 1000 and padded > 200


def test_framed_windows_agree():
    for (length, kernel, stride, causal, _, _), frame in _FRAMED:
        start, end = native._ext.windows(length, kernel, stride, causal, **frame)
        ii = np.arange(frame["q_len"]) + frame["q_offset"]
        py_start, py_end = geometry.window_bounds(ii, length, kernel, stride, causal)
        where = str((length, kernel, stride, causal, frame))
        np.testing.assert_array_equal(start, py_start - frame["kv_offset"], err_msg=where)
        np.testing.assert_array_equal(end, py_end - frame["kv_offset"], err_msg=where)
        # Valid frames keep every window inside the K/V frame.
        assert min(start) >= 0 and max(end) <= frame["kv_len"], where


def test_unframed_default_is_the_whole_axis():
    for params in _AXES[:200]:
        length = params[0]
        whole = dict(q_offset=0, q_len=length, kv_offset=0, kv_len=length)
        assert native._ext.axis_tiling(*params) == native._ext.axis_tiling(*params, **whole)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="stride <= kernel"):
        native._ext.axis_tiling(10, 3, 4, False, 4, 4)
    with pytest.raises(ValueError, match="tiles >= 1"):
        native._ext.axis_tiling(10, 3, 1, False, 0, 4)


@pytest.mark.parametrize("frame, rule", [
    (dict(q_offset=-1, q_len=3), "Q frame"),
    (dict(q_offset=8, q_len=3), "Q frame"),
    (dict(q_len=0), "must be positive"),
    (dict(kv_len=0), "must be positive"),
    (dict(q_offset=4, q_len=2, kv_offset=4, kv_len=2), "inside the K/V frame"),
    (dict(q_offset=0, q_len=2, kv_offset=1, kv_len=9), "inside the K/V frame"),
])
def test_bad_frames_raise(frame, rule):
    with pytest.raises(ValueError, match=rule):
        native._ext.axis_tiling(10, 3, 1, False, 4, 4, **frame)


_NO_TILE = 1 << 30  # gna_geometry.h's kNoTile


def _tile_shape(rank: int, rng) -> tuple[int, ...]:
    """A random KV tile shape of `rank` axes with at most 64 rows."""
    while True:
        shape = tuple(int(rng.choice([1, 2, 3, 4, 5, 8, 16, 32, 64])) for _ in range(rank))
        if np.prod(shape) <= 64:
            return shape


def test_tile_mask_words_are_the_visible_keys():
    """TileBits::word (the sm90a kernels' element masks) against the semantics, row by row.

    A query's window is cut at the end of the K/V frame, as the kernels' QRow holds it; the
    word must then hold exactly the tile rows that are real keys (inside the global axis and
    the K/V frame) inside the window on every axis, and no bit past the tile's rows.
    """
    rng = np.random.default_rng(5)
    kinds = {"empty": 0, "full": 0, "partial": 0}
    for trial in range(3000):
        rank = int(rng.integers(1, 4))
        axes = [_FRAMED[int(rng.integers(len(_FRAMED)))] for _ in range(rank)]
        ext = _tile_shape(rank, rng)
        start, end, origin, real = [], [], [], []
        for (length, kernel, stride, causal, _, _), frame in axes:
            ext_a = ext[len(start)]
            q = frame["q_offset"] + int(rng.integers(frame["q_len"]))
            s, e = geometry.window_bounds(q, length, kernel, stride, causal)
            kv_off, kv_len = frame["kv_offset"], frame["kv_len"]
            start.append(int(s) - kv_off)
            end.append(min(int(e) - kv_off, kv_len))
            # A tile near the window, so that words are often partial.
            lo = max(int(s) - kv_off - ext_a, 0) // ext_a
            hi = (min(int(e) - kv_off + ext_a, kv_len) - 1) // ext_a + 1
            origin.append(int(rng.integers(lo, hi)) * ext_a)
            jj = origin[-1] + np.arange(ext_a)
            real.append((jj < kv_len) & (jj + kv_off >= 0) & (jj + kv_off < length)
                        & (jj + kv_off >= s) & (jj + kv_off < e))
        rows = int(np.prod(ext))
        expected = np.ones(ext, dtype=bool)
        for a in range(rank):  # the outer product of the per-axis keys, last axis fastest
            expected &= real[a].reshape([-1 if b == a else 1 for b in range(rank)])
        word = native._ext.tile_mask_word(list(ext), start, end, origin)
        bits = np.array([(word >> r) & 1 for r in range(rows)], dtype=bool)
        where = f"trial {trial}: tile {ext}, window {start}-{end}, origin {origin}"
        np.testing.assert_array_equal(bits, expected.reshape(-1), err_msg=where)
        assert word >> rows == 0, where
        kinds["empty" if not bits.any() else "full" if bits.all() else "partial"] += 1
        # A tile slot past the box (kNoTile on any axis) is never seen.
        gone = list(origin)
        gone[int(rng.integers(rank))] = _NO_TILE
        assert native._ext.tile_mask_word(list(ext), start, end, gone) == 0, where
    assert min(kinds.values()) > 200, kinds  # every kind of word is exercised


def test_tile_mask_word_bad_arguments_raise():
    with pytest.raises(ValueError, match="at most 64 rows"):
        native._ext.tile_mask_word([8, 16], [0, 0], [8, 16], [0, 0])
    with pytest.raises(ValueError, match="one entry per axis"):
        native._ext.tile_mask_word([8, 8], [0], [8, 8], [0, 0])


def test_tile_walk_visits_every_tile_once_narrowest_windows_slowest():
    rng = np.random.default_rng(11)
    for trial in range(300):
        rank = int(rng.integers(1, 4))
        n = [int(rng.integers(1, 7)) for _ in range(rank)]
        length = [int(rng.integers(1, 100)) for _ in range(rank)]
        kernel = [int(rng.integers(1, m + 1)) for m in length]
        if trial % 3 == 0:  # equal window shares on every axis: the walk keeps axis 0 slowest
            kernel = [m for m in length]
        strides = native._ext.tile_walk_strides(n, kernel, length)
        where = f"n {n}, kernel {kernel}, length {length}: strides {strides}"
        # Every flat index names a different tile, and every tile is named.
        tiles = {tuple(t // s % m for s, m in zip(strides, n)) for t in range(math.prod(n))}
        assert len(tiles) == math.prod(n), where
        # Axes nest by window share kernel/length, the smallest share slowest, ties by axis.
        order = sorted(range(rank), key=lambda a: (Fraction(kernel[a], length[a]), a))
        expected = [0] * rank
        for i, a in enumerate(order):
            expected[a] = math.prod(n[b] for b in order[i + 1:])
        assert list(strides) == expected, where
    # The problem that motivated it: Hunyuan's windows 18x24x24 over 30x48x80, KV tiles 2x8x8.
    assert list(native._ext.tile_walk_strides([15, 6, 10], [18, 24, 24], [30, 48, 80])) == [
        1, 15, 90]
    # Equal shares (FLUX-4K: 80x80 over 256x256) keep axis 0 slowest.
    assert list(native._ext.tile_walk_strides([32, 16], [80, 80], [256, 256])) == [16, 1]
    with pytest.raises(ValueError, match="one entry per axis"):
        native._ext.tile_walk_strides([2, 2], [1], [4, 4])
    with pytest.raises(ValueError, match="kernel <= length"):
        native._ext.tile_walk_strides([2], [5], [4])


def _kv_tile_work(lengths, kernel, stride, causal, q_tile, kv_tile):
    """Q tiles that see each flat KV tile (tile_walk_strides' order), from jax_gna.geometry."""
    tilings = [geometry.axis_tiling(*axis) for axis in
               zip(lengths, kernel, stride, causal, q_tile, kv_tile)]
    n = [t.n_kv for t in tilings]
    strides = native._ext.tile_walk_strides(n, kernel, lengths)
    return [math.prod(int(t.q_hi[f // s % m] - t.q_lo[f // s % m])
                      for t, s, m in zip(tilings, strides, n))
            for f in range(math.prod(n))]


@pytest.mark.skipif(not native.has_cuda(), reason="the CUDA handlers are not built")
def test_kv_tile_order_takes_the_most_seen_tiles_first():
    def order(lengths, kernel, stride, causal, q_tile, kv_tile, dilation=None):
        rank = len(lengths)
        return list(native._ext.kv_tile_order(
            [1, *lengths, 2, 32], [1, *lengths, 1, 32], kernel, stride,
            dilation or [1] * rank, [int(c) for c in causal], q_tile, kv_tile))

    rng = np.random.default_rng(29)
    for trial in range(200):
        rank = int(rng.integers(1, 4))
        lengths = [int(rng.integers(1, 90)) for _ in range(rank)]
        kernel = [int(rng.integers(1, m + 1)) for m in lengths]
        stride = [int(rng.integers(1, k + 1)) if rng.random() < 0.5 else 1 for k in kernel]
        causal = [bool(rng.random() < 0.3) for _ in range(rank)]
        q_tile = [int(rng.choice([1, 2, 4, 8])) for _ in range(rank)]
        kv_tile = [int(rng.choice([1, 2, 4, 8])) for _ in range(rank)]
        got = order(lengths, kernel, stride, causal, q_tile, kv_tile)
        work = _kv_tile_work(lengths, kernel, stride, causal, q_tile, kv_tile)
        # Most work first; equal work in flat order, which keeps the grid's L2 walk.
        assert got == sorted(range(len(work)), key=lambda f: (-work[f], f)), (
            trial, lengths, kernel, stride, causal, q_tile, kv_tile)

    # The 1-D problem that motivated it: 32k tokens, window 2048, stride 256, 128-token tiles.
    # Tiles near the ends are seen by up to 24 Q tiles (the clamped windows), the others by 16.
    got = order([32768], [2048], [256], [False], [128], [128])
    work = _kv_tile_work([32768], [2048], [256], [False], [128], [128])
    assert sorted(got) == list(range(256))
    assert [work[f] for f in got[:2]] == [24, 24] and work[got[-1]] == 8
    assert [work[f] for f in got] == sorted(work, reverse=True)

    # Dilation: the flat index runs over the groups' tiles, and every one appears once.
    got = order([50, 37], [7, 5], [1, 2], [False, True], [4, 2], [2, 4], dilation=[3, 2])
    assert sorted(got) == list(range(len(got)))


@pytest.mark.skipif(not native.has_cuda(), reason="the CUDA handlers are not built")
def test_backward_cta_boxes_agree():
    """geometry.backward_kv_tile and backward_kv_rows mirror cuda/backward_tiles.h's
    with_doubled_kv_tile and dkdv_rows_128, which decide the boxes of the backward's dK/dV
    CTAs."""
    rng = np.random.default_rng()
    fallbacks, rows = 0, set()
    for trial in range(400):
        rank = int(rng.integers(1, 4))
        lengths = [int(rng.integers(1, 90)) for _ in range(rank)]
        dilation = [int(rng.integers(1, 3)) if n >= 8 else 1 for n in lengths]
        kernel = [int(rng.integers(1, n // d + 1)) for n, d in zip(lengths, dilation)]
        stride = [int(rng.integers(1, k + 1)) if rng.random() < 0.3 else 1 for k in kernel]
        causal = [bool(rng.random() < 0.2) for _ in range(rank)]
        q_tile = [int(rng.choice([1, 2, 4, 8, 16])) for _ in range(rank)]
        kv_tile = [int(rng.choice([1, 2, 4, 8, 16])) for _ in range(rank)]
        got_tile, got_rows = native._ext.backward_ctas(
            [1, *lengths, 2, 32], [1, *lengths, 1, 32], kernel, stride, dilation,
            [int(c) for c in causal], q_tile, kv_tile)
        axes = [geometry.AxisParams(*a) for a in zip(lengths, kernel, stride, dilation, causal)]
        where = (trial, lengths, kernel, stride, dilation, causal, q_tile, kv_tile)
        assert tuple(got_tile) == geometry.backward_kv_tile(axes, q_tile, kv_tile), where
        assert got_rows == geometry.backward_kv_rows(axes, q_tile, kv_tile), where
        fallbacks += all(2 * kv > q for q, kv in zip(q_tile, kv_tile))
        rows.add(got_rows)
    assert fallbacks > 20 and rows == {64, 128}  # both rules' branches were exercised
