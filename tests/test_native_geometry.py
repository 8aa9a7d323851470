"""cuda/gna_geometry.h (the native port) agrees with jax_gna.geometry tile for tile.

The C++ side is reached through the extension's `axis_tiling` and `windows` functions,
which call gna::AxisTiling and gna::window_bounds exactly as the handlers and kernels do.
"""

from __future__ import annotations

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


def test_axis_tilings_agree_tile_for_tile():
    checked_partial = checked_full = 0
    for params in _AXES:
        cpp = native._ext.axis_tiling(*params)
        py = geometry.axis_tiling(*params)
        where = f"(length, kernel, stride, causal, q_tile, kv_tile) = {params}"
        np.testing.assert_array_equal(cpp["kv_lo"], py.kv_lo, err_msg=where)
        np.testing.assert_array_equal(cpp["kv_hi"], py.kv_hi, err_msg=where)
        full = np.asarray(cpp["full"], dtype=bool).reshape(py.n_q, py.n_kv)
        np.testing.assert_array_equal(full, py.full, err_msg=where)
        # q ranges: equal where non-empty; an unseen KV tile is an empty range on both sides.
        cpp_q = np.stack([cpp["q_lo"], cpp["q_hi"]], axis=1)
        py_q = np.stack([py.q_lo, py.q_hi], axis=1)
        empty = py_q[:, 0] >= py_q[:, 1]
        np.testing.assert_array_equal(cpp_q[:, 0] >= cpp_q[:, 1], empty, err_msg=where)
        np.testing.assert_array_equal(cpp_q[~empty], py_q[~empty], err_msg=where)
        # The C++ ranges reproduce Python's visibility matrix.
        kt = np.arange(py.n_kv)
        visible = ((kt[None, :] >= np.asarray(cpp["kv_lo"])[:, None])
                   & (kt[None, :] < np.asarray(cpp["kv_hi"])[:, None]))
        np.testing.assert_array_equal(visible, py.visible, err_msg=where)
        checked_full += int(py.full.sum())
        checked_partial += int((py.visible & ~py.full).sum())
    assert checked_full > 1000 and checked_partial > 1000  # both tile kinds are exercised


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="stride <= kernel"):
        native._ext.axis_tiling(10, 3, 4, False, 4, 4)
    with pytest.raises(ValueError, match="tiles >= 1"):
        native._ext.axis_tiling(10, 3, 1, False, 0, 4)
