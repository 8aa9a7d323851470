"""The one semantics module (`jax_gna.geometry`) against an independent brute force.

The brute force (`battery.brute_mask`) is written from DESIGN.md §2 without calling
`geometry`; here the element-level mask, the counting helpers and the tile geometry
(visible / full / kv ranges / q ranges, padded dilation groups) are all checked against it.
"""

from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
import numpy as np
import pytest

import battery
import jax_gna
from jax_gna import geometry

_CASES = battery.EDGE_CASES + battery.random_cases(300, seed=31)


def _mask(case: battery.Case) -> np.ndarray:
    return battery.brute_mask(case.shape, case.kernel, case.stride, case.dilation, case.causal)


def test_neighborhood_mask_matches_brute_force():
    for case in _CASES:
        np.testing.assert_array_equal(jax_gna.neighborhood_mask(case.shape, case.cfg),
                                      _mask(case), err_msg=case.name)


def test_neighborhood_size_counts_the_mask():
    for case in _CASES[:120]:
        axes = case.cfg.resolve(case.shape)
        assert geometry.neighborhood_size(axes) == int(_mask(case).sum()), case.name


def test_window_bounds_is_the_same_in_numpy_and_jnp():
    for length, kernel, stride, causal in itertools.product((5, 12), (2, 5), (1, 2), (0, 1)):
        if stride > kernel or kernel > length:
            continue
        ii = np.arange(length)
        expected = geometry.window_bounds(ii, length, kernel, stride, bool(causal))
        actual = geometry.window_bounds(jnp.asarray(ii), jnp.int32(length), kernel, stride,
                                        bool(causal), xp=jnp)
        for e, a in zip(expected, actual):
            np.testing.assert_array_equal(np.asarray(a), np.broadcast_to(e, ii.shape))


# ----------------------------------------------------------------------------------------
# Invariants.
# ----------------------------------------------------------------------------------------

def test_non_causal_query_sees_exactly_prod_k_keys():
    checked = 0
    for case in _CASES:
        if any(case.causal):
            continue
        kernels = [length if k == -1 else k for k, length in zip(case.kernel, case.shape)]
        assert (_mask(case).sum(axis=1) == math.prod(kernels)).all(), case.name
        checked += 1
    assert checked > 50


def test_causal_query_sees_itself_and_no_future_key():
    for case in _CASES:
        mask = _mask(case)
        assert mask.diagonal().all(), case.name
        coords = np.stack(np.unravel_index(np.arange(mask.shape[0]), case.shape), axis=1)
        for a, causal in enumerate(case.causal):
            if causal:
                future = coords[None, :, a] > coords[:, None, a]
                assert not (mask & future).any(), case.name


@pytest.mark.parametrize("shape,kernel", [((12,), (4,)), ((6, 9), (3, 3)),
                                          ((4, 6, 8), (2, 3, 4)), ((10, 4), (5, 2))])
def test_stride_equal_kernel_is_block_diagonal(shape, kernel):
    cfg = jax_gna.GNAConfig(kernel, stride=kernel)
    coords = np.stack(np.unravel_index(np.arange(math.prod(shape)), shape), axis=1)
    block = coords // np.asarray(kernel)
    expected = (block[:, None, :] == block[None, :, :]).all(axis=-1)
    np.testing.assert_array_equal(jax_gna.neighborhood_mask(shape, cfg), expected)


@pytest.mark.parametrize("shape", [(9,), (5, 7), (3, 4, 5)])
def test_whole_axis_non_causal_is_dense(shape):
    for kernel in (tuple(shape), -1):
        mask = jax_gna.neighborhood_mask(shape, jax_gna.GNAConfig(kernel))
        assert mask.all()
    assert geometry.dense_equivalent(jax_gna.GNAConfig(-1).resolve(shape))
    assert not geometry.dense_equivalent(jax_gna.GNAConfig(-1, is_causal=True).resolve(shape))


# ----------------------------------------------------------------------------------------
# Tile geometry against the dense mask.
# ----------------------------------------------------------------------------------------

def _group_mask(case: battery.Case, groups: tuple[int, ...]) -> np.ndarray:
    """Brute-force mask restricted to one dilation group per axis, as [*Lg, *Lg]."""
    sel = [np.arange(g, length, d) for g, length, d in zip(groups, case.shape, case.dilation)]
    flat = np.ravel_multi_index(np.meshgrid(*sel, indexing="ij"), case.shape).reshape(-1)
    lg = tuple(len(s) for s in sel)
    return _mask(case)[np.ix_(flat, flat)].reshape(*lg, *lg)


def _tile_truth(mask: np.ndarray, lg, q_tile, kv_tile):
    """Brute-force (visible, full) over multi-D tile pairs, as [NQ..., NK...]."""
    n_q = [-(-length // t) for length, t in zip(lg, q_tile)]
    n_kv = [-(-length // t) for length, t in zip(lg, kv_tile)]
    visible = np.zeros((*n_q, *n_kv), dtype=bool)
    full = np.zeros_like(visible)
    for qt in itertools.product(*map(range, n_q)):
        qs = tuple(slice(t * s, (t + 1) * s) for t, s in zip(qt, q_tile))
        for kt in itertools.product(*map(range, n_kv)):
            ks = tuple(slice(t * s, (t + 1) * s) for t, s in zip(kt, kv_tile))
            block = mask[qs + ks]
            no_padding = all((t + 1) * s <= length for t, s, length in zip(kt, kv_tile, lg))
            visible[qt + kt] = block.any()
            full[qt + kt] = block.all() and no_padding
    return visible, full


def _outer(per_axis: list[np.ndarray]) -> np.ndarray:
    """[n_q_a, n_kv_a] per axis -> [n_q_1.., n_kv_1..] (AND over axes)."""
    rank = len(per_axis)
    out = np.ones((1,) * 2 * rank, dtype=bool)
    for a, m in enumerate(per_axis):
        shape = [1] * 2 * rank
        shape[a], shape[rank + a] = m.shape
        out = out & m.reshape(shape)
    return out


_TILE_CASES = [c for c in battery.random_cases(45, seed=41) if math.prod(c.shape) <= 400]


@pytest.mark.parametrize("case", _TILE_CASES, ids=lambda c: c.name)
def test_axis_tiling_matches_dense_mask(case):
    rng = np.random.default_rng(math.prod(case.shape))
    axes = case.cfg.resolve(case.shape)
    q_tile = tuple(int(rng.integers(1, 5)) for _ in axes)
    kv_tile = tuple(int(rng.integers(1, 5)) for _ in axes)
    for groups in itertools.product(*(range(a.dilation) for a in axes)):
        lg = [geometry.group_length(a.length, a.dilation, g) for a, g in zip(axes, groups)]
        tilings = [geometry.axis_tiling(length, a.kernel, a.stride, a.causal, tq, tk)
                   for length, a, tq, tk in zip(lg, axes, q_tile, kv_tile)]
        visible, full = _tile_truth(_group_mask(case, groups), lg, q_tile, kv_tile)
        np.testing.assert_array_equal(_outer([t.visible for t in tilings]), visible)
        np.testing.assert_array_equal(_outer([t.full for t in tilings]), full)
        for t in tilings:
            # Per axis: rows are contiguous ranges [kv_lo, kv_hi), columns [q_lo, q_hi).
            kt, qt = np.arange(t.n_kv), np.arange(t.n_q)
            np.testing.assert_array_equal(
                t.visible, (kt >= t.kv_lo[:, None]) & (kt < t.kv_hi[:, None]))
            seen = t.visible.any(axis=0)
            np.testing.assert_array_equal(
                t.visible.T[seen], ((qt >= t.q_lo[:, None]) & (qt < t.q_hi[:, None]))[seen])
            assert seen.all() or (t.q_lo[~seen] == t.q_hi[~seen]).all()


@pytest.mark.parametrize("case", _TILE_CASES, ids=lambda c: c.name)
def test_padded_group_tiling_covers_every_group(case):
    """Padded (union) tiles: every neighbour pair of every group lies in a visible pair, and a
    pair marked full is full in every group that has queries in it."""
    axes = case.cfg.resolve(case.shape)
    q_tile, kv_tile = (2,) * len(axes), (3,) * len(axes)
    padded = [geometry.padded_group_tiling(a, tq, tk) for a, tq, tk in zip(axes, q_tile, kv_tile)]
    visible, full = _outer([p[0] for p in padded]), _outer([p[1] for p in padded])
    for groups in itertools.product(*(range(a.dilation) for a in axes)):
        lg = [geometry.group_length(a.length, a.dilation, g) for a, g in zip(axes, groups)]
        g_visible, g_full = _tile_truth(_group_mask(case, groups), lg, q_tile, kv_tile)
        box = tuple(slice(0, n) for n in g_visible.shape)
        assert not (g_visible & ~visible[box]).any(), groups
        assert not (full[box] & ~g_full).any(), groups
        if all(g == 0 for g in groups):  # group 0 is the longest: it sets the padded extent
            assert g_visible.shape == visible.shape
