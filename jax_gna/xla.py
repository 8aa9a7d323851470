"""The `xla` implementation: tiled GNA in plain jnp, portable to every XLA backend.

Scheme
------
1. **Dilation groups become batch.** Each spatial axis of length ``L`` with dilation ``d`` is
   zero-padded to ``d * n * T`` (``n`` tiles of ``T`` group indices) and reshaped so that
   token ``i = ii * d + g`` lands at group ``g``, group index ``ii``. The ``d`` groups of
   every axis join the batch; inside a group the problem is undilated.
2. **Tiles.** Group indices are cut into multi-dimensional boxes (Q tiles of ``q_tile``, KV
   tiles of ``kv_tile``) and flattened to ``[B, groups, tiles, heads, tile tokens, D]``.
3. **Visit lists, on the host at trace time.** `geometry.padded_group_tiling` says, per axis,
   which (Q tile, KV tile) pairs are visible and which are full (no element masked) in every
   dilation group. A multi-dimensional pair is visited iff visible on every axis and full iff
   full on every axis. For each Q tile we list its full and its partial KV tiles and pad the
   lists to a common length with a validity flag.
4. **Online softmax.** Two `lax.scan`s walk the lists, all Q tiles in parallel: each step
   gathers one KV tile per Q tile, computes ``[.., TQ, TK]`` scores, and folds them into the
   running max / sum / output (float32, or float64 for float64 inputs). Full steps apply only
   the per-tile validity flag; partial steps build the element mask with
   `geometry.window_bounds`, using each dilation group's true length so that padding never
   leaks in. Memory is linear in tokens: nothing larger than the gathered tiles and one step's
   scores exists at a time, and no ``N x N`` array is ever built.
5. **Gradients** (`jax.custom_vjp`). The forward saves ``(q, k, v, out, lse)``; the backward
   recomputes probabilities from ``lse`` over the same lists (FlashAttention-2 style). By
   default one Q-major pass accumulates ``dq`` per Q tile and scatter-adds ``dk, dv`` into
   KV tiles. With ``deterministic=True`` the ``dk, dv`` come from a second, KV-major pass over
   the inverted lists (gathers only, no scatter), so the result is bitwise reproducible.

GQA never repeats K/V: query heads are viewed as ``[H_kv, G]``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_gna import geometry
from jax_gna.config import AxisParams


# ----------------------------------------------------------------------------------------
# Static plan and host-side visit lists.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one call (hashable: a `custom_vjp` non-diff argument)."""

    axes: tuple[AxisParams, ...]
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    scale: float
    deterministic: bool
    frames: tuple[geometry.AxisFrame, ...]

    @property
    def q_len(self) -> tuple[int, ...]:
        """Tokens of the Q buffer per axis (the whole axis unless framed)."""
        return tuple(f.q_length for f in self.frames)

    @property
    def kv_len(self) -> tuple[int, ...]:
        return tuple(f.kv_length for f in self.frames)

    @property
    def n_q(self) -> tuple[int, ...]:
        """Q tiles per axis over the longest dilation group (group 0)."""
        return tuple(-(-geometry.group_length(n, a.dilation, 0) // t)
                     for a, n, t in zip(self.axes, self.q_len, self.q_tile))

    @property
    def n_kv(self) -> tuple[int, ...]:
        return tuple(-(-geometry.group_length(n, a.dilation, 0) // t)
                     for a, n, t in zip(self.axes, self.kv_len, self.kv_tile))


@dataclasses.dataclass(frozen=True)
class _Visits:
    """Padded visit lists: at step ``t`` row ``r`` visits tile ``tile[t, r]`` if ``valid``.

    Attributes:
      tile: ``[steps, rows]`` int32 flat index of the visited tile (row-major over axes).
      coords: per axis ``[steps, rows]`` int32 coordinate of the visited tile.
      valid: ``[steps, rows]`` bool; False marks padding entries.
    """

    tile: np.ndarray
    coords: tuple[np.ndarray, ...]
    valid: np.ndarray

    @property
    def all_valid(self) -> bool:
        return bool(self.valid.all())


def _pair_matrices(plan: _Plan) -> tuple[np.ndarray, np.ndarray]:
    """``(visible, full)`` as ``[NQ, NK]`` bool over flat multi-dimensional tile indices."""
    visible = np.ones((1, 1), dtype=bool)
    full = np.ones((1, 1), dtype=bool)
    for axis, tq, tk, frame in zip(plan.axes, plan.q_tile, plan.kv_tile, plan.frames):
        vis_a, full_a = geometry.padded_group_tiling(axis, tq, tk, frame)

        def outer(m, m_a):
            # Row-major flattening: the earlier axis is the slower one.
            return (m[:, None, :, None] & m_a[None, :, None, :]).reshape(
                m.shape[0] * m_a.shape[0], m.shape[1] * m_a.shape[1])

        visible, full = outer(visible, vis_a), outer(full, full_a)
    return visible, full & visible


def _lists(pairs: np.ndarray, other_shape: tuple[int, ...]) -> _Visits:
    """Visit lists of the True columns of each row of `pairs` ``[rows, cols]``."""
    steps = int(pairs.sum(axis=1).max()) if pairs.size else 0
    # A stable sort of ~pairs puts each row's True columns first, in increasing order.
    order = np.argsort(~pairs, axis=1, kind="stable")[:, :steps]
    valid = np.take_along_axis(pairs, order, axis=1)
    coords = np.unravel_index(order, other_shape)
    return _Visits(tile=order.T.astype(np.int32),
                   coords=tuple(c.T.astype(np.int32) for c in coords),
                   valid=valid.T.copy())


@functools.lru_cache(maxsize=128)
def _visits(plan: _Plan) -> dict[str, _Visits]:
    """Q-major (``full``, ``partial``) and KV-major (``full_t``, ``partial_t``) lists."""
    visible, full = _pair_matrices(plan)
    partial = visible & ~full
    return {"full": _lists(full, plan.n_kv), "partial": _lists(partial, plan.n_kv),
            "full_t": _lists(full.T, plan.n_q), "partial_t": _lists(partial.T, plan.n_q)}


# ----------------------------------------------------------------------------------------
# Layout: [B, *spatial, H, D] <-> [B, groups, tiles, H, tile tokens, D].
# ----------------------------------------------------------------------------------------

def _to_tiles(x: jax.Array, plan: _Plan, tile: Sequence[int],
              n_tiles: Sequence[int]) -> jax.Array:
    """``[B, *spatial, H, D]`` -> ``[B, prod(d), prod(n_tiles), H, prod(tile), D]``.

    Padding (to ``d * n * T`` per axis) is zeros.
    """
    rank = len(plan.axes)
    b, h, d = x.shape[0], x.shape[-2], x.shape[-1]
    pad = [(0, 0)] + [(0, a.dilation * n * t - length)
                      for a, n, t, length in zip(plan.axes, n_tiles, tile, x.shape[1:-2])]
    pad += [(0, 0), (0, 0)]
    x = jnp.pad(x, pad)
    split = [b]
    for a, n, t in zip(plan.axes, n_tiles, tile):
        split += [n, t, a.dilation]
    x = x.reshape(*split, h, d)
    # Axes of x now: 0 batch, then (n, T, d) per spatial axis, then H, D.
    groups = [3 + 3 * a for a in range(rank)]
    tiles = [1 + 3 * a for a in range(rank)]
    inner = [2 + 3 * a for a in range(rank)]
    x = x.transpose(0, *groups, *tiles, 1 + 3 * rank, *inner, 2 + 3 * rank)
    return x.reshape(b, math.prod(a.dilation for a in plan.axes), math.prod(n_tiles), h,
                     math.prod(tile), d)


def _from_tiles(x: jax.Array, plan: _Plan, tile: Sequence[int], n_tiles: Sequence[int],
                lengths: Sequence[int]) -> jax.Array:
    """Inverse of `_to_tiles` for an axis of `lengths` tokens (drops the padding)."""
    rank = len(plan.axes)
    b, h, d = x.shape[0], x.shape[3], x.shape[-1]
    x = x.reshape(b, *(a.dilation for a in plan.axes), *n_tiles, h, *tile, d)
    # Axes: 0 batch, 1..r groups, r+1..2r tiles, 2r+1 heads, 2r+2..3r+1 inner, 3r+2 D.
    order = [0]
    for a in range(rank):
        order += [1 + rank + a, 2 + 2 * rank + a, 1 + a]
    x = x.transpose(*order, 1 + 2 * rank, 2 + 3 * rank)
    x = x.reshape(b, *(a.dilation * n * t for a, n, t in zip(plan.axes, n_tiles, tile)), h, d)
    return x[(slice(None), *(slice(0, n) for n in lengths))]


def _q_tiles(x: jax.Array, plan: _Plan, h_kv: int) -> jax.Array:
    """Query-side tiles with heads split for GQA: ``[B, Dg, NQ, H_kv, G, TQ, D]``."""
    t = _to_tiles(x, plan, plan.q_tile, plan.n_q)
    return t.reshape(*t.shape[:3], h_kv, t.shape[3] // h_kv, *t.shape[4:])


def _q_untile(t: jax.Array, plan: _Plan) -> jax.Array:
    """Inverse of `_q_tiles`."""
    t = t.reshape(*t.shape[:3], t.shape[3] * t.shape[4], *t.shape[5:])
    return _from_tiles(t, plan, plan.q_tile, plan.n_q, plan.q_len)


def _kv_tiles(x: jax.Array, plan: _Plan) -> jax.Array:
    """Key/value tiles: ``[B, Dg, NK, H_kv, TK, D]``."""
    return _to_tiles(x, plan, plan.kv_tile, plan.n_kv)


# ----------------------------------------------------------------------------------------
# Element masks of partial tiles.
# ----------------------------------------------------------------------------------------

def _element_mask(plan: _Plan, q_coords: Sequence[jax.Array],
                  kv_coords: Sequence[jax.Array]) -> jax.Array:
    """``[Dg, M, TQ, TK]`` bool: which (query, key) pairs of M tile pairs are neighbours.

    Args:
      q_coords, kv_coords: per axis ``[M]`` int tile coordinates of the M pairs.

    Tile coordinates are local to the frames; windows are those of the global axis
    (``window_bounds`` gets every group's global length as an array). A key must lie inside
    the query's window, which never reaches outside the axis, and inside its group of the
    K/V buffer, so padding keys are masked and the result is exact for every group.
    """
    rank = len(plan.axes)
    mask = None
    for a, (axis, frame) in enumerate(zip(plan.axes, plan.frames)):
        tq, tk, d = plan.q_tile[a], plan.kv_tile[a], axis.dilation
        lg, kv_lg = (jnp.asarray([geometry.group_length(n, d, g) for g in range(d)],
                                 jnp.int32)[:, None, None]
                     for n in (axis.length, frame.kv_length))
        ii = jnp.asarray(q_coords[a])[None, :, None] * tq + jnp.arange(tq)      # [1, M, TQ]
        jj = jnp.asarray(kv_coords[a])[None, :, None] * tk + jnp.arange(tk)     # [1, M, TK]
        start, end = geometry.window_bounds(ii + frame.q_offset // d, lg, axis.kernel,
                                            axis.stride, axis.causal, xp=jnp)
        jg = jj[:, :, None, :] + frame.kv_offset // d                          # global index
        m = ((jg >= start[..., None]) & (jg < end[..., None])
             & (jj[:, :, None, :] < kv_lg[..., None]))                          # [d, M, TQ, TK]
        # Place (d_a, M, TQ_a, TK_a) at positions (a, r, r+1+a, 2r+1+a) of the full layout.
        shape = [1] * (3 * rank + 1)
        shape[a], shape[rank] = axis.dilation, m.shape[1]
        shape[rank + 1 + a], shape[2 * rank + 1 + a] = tq, tk
        m = m.reshape(shape)
        mask = m if mask is None else mask & m
    dg = math.prod(a.dilation for a in plan.axes)
    full_shape = (*(a.dilation for a in plan.axes), mask.shape[rank], *plan.q_tile,
                  *plan.kv_tile)
    return jnp.broadcast_to(mask, full_shape).reshape(
        dg, mask.shape[rank], math.prod(plan.q_tile), math.prod(plan.kv_tile))


def _step_mask(plan: _Plan, visits: _Visits, valid: jax.Array, coords, partial: bool,
               q_major: bool):
    """Mask broadcastable to scores ``[B, Dg, M, H_kv, G, TQ, TK]``, or None if not needed.

    `valid` and `coords` are one step's slices of `visits` (traced under `lax.scan`).
    """
    mask = None
    if not visits.all_valid:
        mask = valid[None, None, :, None, None, None, None]
    if partial:
        rows = [jnp.arange(n) for n in (plan.n_q if q_major else plan.n_kv)]
        own = [c.reshape(-1) for c in jnp.meshgrid(*rows, indexing="ij")]
        q_c, kv_c = (own, coords) if q_major else (coords, own)
        elem = _element_mask(plan, q_c, kv_c)[None, :, :, None, None]
        mask = elem if mask is None else mask & elem
    return mask


# ----------------------------------------------------------------------------------------
# Tile math shared by forward and backward.
# ----------------------------------------------------------------------------------------

def _precision(dtype) -> jax.lax.Precision:
    # f32/f64 inputs must not silently drop to TF32/bf16 passes on accelerators.
    return (jax.lax.Precision.HIGHEST if jnp.dtype(dtype).itemsize >= 4
            else jax.lax.Precision.DEFAULT)


def _acc_dtype(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def _scores(q: jax.Array, k: jax.Array, scale: float) -> jax.Array:
    """``[.., H_kv, G, TQ, D] x [.., H_kv, TK, D] -> [.., H_kv, G, TQ, TK]`` scaled."""
    acc = _acc_dtype(q.dtype)
    s = jnp.einsum("...hgqd,...hkd->...hgqk", q, k, preferred_element_type=acc,
                   precision=_precision(q.dtype))
    return s * jnp.asarray(scale, acc)


def _matmul(eq: str, a: jax.Array, b: jax.Array, in_dtype) -> jax.Array:
    """einsum with operands cast to the input dtype and accumulation in `_acc_dtype`."""
    return jnp.einsum(eq, a.astype(in_dtype), b.astype(in_dtype),
                      preferred_element_type=_acc_dtype(in_dtype),
                      precision=_precision(in_dtype))


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """Tiles ``idx [M]`` of ``x [B, Dg, N, ...]`` -> ``[B, Dg, M, ...]``."""
    return jnp.take(x, idx, axis=2, mode="clip")


# ----------------------------------------------------------------------------------------
# Forward.
# ----------------------------------------------------------------------------------------

def _forward(q: jax.Array, k: jax.Array, v: jax.Array, plan: _Plan):
    """Returns ``out`` (q's dtype) and ``lse`` (accumulation dtype), both untiled."""
    h_kv = k.shape[-2]
    acc = _acc_dtype(q.dtype)
    qt = _q_tiles(q, plan, h_kv)
    kt, vt = _kv_tiles(k, plan), _kv_tiles(v, plan)
    row_shape = qt.shape[:-1]                                   # [B, Dg, NQ, H_kv, G, TQ]
    carry = (jnp.full(row_shape, -jnp.inf, acc), jnp.zeros(row_shape, acc),
             jnp.zeros(qt.shape, acc))
    visits = _visits(plan)
    for name, partial in (("full", False), ("partial", True)):
        lists = visits[name]

        def step(carry, xs, lists=lists, partial=partial):
            idx, valid, coords = xs
            kg, vg = _gather(kt, idx), _gather(vt, idx)
            s = _scores(qt, kg, plan.scale)
            mask = _step_mask(plan, lists, valid, coords, partial, q_major=True)
            if mask is not None:
                s = jnp.where(mask, s, -jnp.inf)
            return _online_softmax(carry, s, vg, q.dtype), None

        carry, _ = jax.lax.scan(step, carry, (lists.tile, lists.valid, lists.coords))
    m, l, o = carry
    seen = l > 0
    out = jnp.where(seen[..., None], o / jnp.where(seen, l, 1)[..., None], 0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1)), -jnp.inf)
    out = _q_untile(out.astype(q.dtype), plan)
    lse = _q_untile(lse[..., None], plan)[..., 0]
    return out, lse


def _online_softmax(carry, s: jax.Array, v: jax.Array, in_dtype):
    """Folds one step's masked scores ``s`` and values ``v`` into (max, sum, output)."""
    m, l, o = carry
    m_new = jnp.maximum(m, s.max(axis=-1))
    # Rows with nothing seen yet keep max -inf; exp(-inf - 0) = 0 keeps them NaN-free.
    m_safe = jnp.where(jnp.isneginf(m_new), 0, m_new)
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe[..., None])
    l = l * alpha + p.sum(axis=-1)
    o = o * alpha[..., None] + _matmul("...hgqk,...hkd->...hgqd", p, v, in_dtype)
    return m_new, l, o


# ----------------------------------------------------------------------------------------
# Backward.
# ----------------------------------------------------------------------------------------

def _probs(q: jax.Array, k: jax.Array, lse: jax.Array, mask, scale: float) -> jax.Array:
    """Recomputed probabilities ``exp(s - lse)``, zero where masked."""
    s = _scores(q, k, scale)
    lse = jnp.where(jnp.isneginf(lse), 0, lse)      # fully masked rows: p = 0 below anyway
    p = jnp.exp(s - lse[..., None])
    return p if mask is None else jnp.where(mask, p, 0)


def _dscores(p: jax.Array, do: jax.Array, v: jax.Array, delta: jax.Array,
             in_dtype) -> jax.Array:
    """``dS = P * (dO V^T - delta)`` (scale not applied)."""
    dp = _matmul("...hgqd,...hkd->...hgqk", do, v, in_dtype)
    return p * (dp - delta[..., None])


def _backward(plan: _Plan, res, cotangents):
    q, k, v, out, lse = res
    dout, dlse = cotangents
    h_kv = k.shape[-2]
    dtype = q.dtype
    acc = _acc_dtype(dtype)
    # delta_i = sum_d dO_i O_i - dlse_i: the lse cotangent enters as dS += P * dlse.
    delta = (jnp.sum(dout.astype(acc) * out.astype(acc), axis=-1)
             - dlse.astype(acc))
    qt, dot = _q_tiles(q, plan, h_kv), _q_tiles(dout, plan, h_kv)
    lset = _q_tiles(lse.astype(acc)[..., None], plan, h_kv)[..., 0]
    deltat = _q_tiles(delta[..., None], plan, h_kv)[..., 0]
    kt, vt = _kv_tiles(k, plan), _kv_tiles(v, plan)
    scale = jnp.asarray(plan.scale, acc)
    visits = _visits(plan)
    with_kv = not plan.deterministic

    # Q-major pass: dq always; dk/dv by scatter-add unless deterministic.
    carry = (jnp.zeros(qt.shape, acc), jnp.zeros(kt.shape, acc), jnp.zeros(kt.shape, acc))
    for name, partial in (("full", False), ("partial", True)):
        lists = visits[name]

        def q_step(carry, xs, lists=lists, partial=partial):
            dq, dk, dv = carry
            idx, valid, coords = xs
            kg, vg = _gather(kt, idx), _gather(vt, idx)
            mask = _step_mask(plan, lists, valid, coords, partial, q_major=True)
            p = _probs(qt, kg, lset, mask, plan.scale)
            ds = _dscores(p, dot, vg, deltat, dtype)
            dq = dq + scale * _matmul("...hgqk,...hkd->...hgqd", ds, kg, dtype)
            if with_kv:
                dk_c = scale * _matmul("...hgqk,...hgqd->...hkd", ds, qt, dtype)
                dv_c = _matmul("...hgqk,...hgqd->...hkd", p, dot, dtype)
                dk = dk.at[:, :, idx].add(dk_c, mode="promise_in_bounds")
                dv = dv.at[:, :, idx].add(dv_c, mode="promise_in_bounds")
            return (dq, dk, dv), None

        carry, _ = jax.lax.scan(q_step, carry, (lists.tile, lists.valid, lists.coords))
    dq, dk, dv = carry

    if not with_kv:
        # KV-major pass over the inverted lists: each KV tile gathers the Q tiles that see it.
        carry = (dk, dv)
        for name, partial in (("full_t", False), ("partial_t", True)):
            lists = visits[name]

            def kv_step(carry, xs, lists=lists, partial=partial):
                dk, dv = carry
                idx, valid, coords = xs
                qg, dog = _gather(qt, idx), _gather(dot, idx)
                lseg, deltag = _gather(lset, idx), _gather(deltat, idx)
                mask = _step_mask(plan, lists, valid, coords, partial, q_major=False)
                p = _probs(qg, kt, lseg, mask, plan.scale)
                ds = _dscores(p, dog, vt, deltag, dtype)
                dk = dk + scale * _matmul("...hgqk,...hgqd->...hkd", ds, qg, dtype)
                dv = dv + _matmul("...hgqk,...hgqd->...hkd", p, dog, dtype)
                return (dk, dv), None

            carry, _ = jax.lax.scan(kv_step, carry, (lists.tile, lists.valid, lists.coords))
        dk, dv = carry

    dq = _q_untile(dq, plan).astype(dtype)
    dk = _from_tiles(dk, plan, plan.kv_tile, plan.n_kv, plan.kv_len).astype(dtype)
    dv = _from_tiles(dv, plan, plan.kv_tile, plan.n_kv, plan.kv_len).astype(dtype)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------
# custom_vjp wiring and the public entry.
# ----------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, plan: _Plan):
    return _forward(q, k, v, plan)


def _attention_fwd(q, k, v, plan: _Plan):
    out, lse = _forward(q, k, v, plan)
    return (out, lse), (q, k, v, out, lse)


_attention.defvjp(_attention_fwd, _backward)


def make_plan(axes: Sequence[AxisParams], scale: float, head_dim: int,
              q_tile_shape: Sequence[int] | None = None,
              kv_tile_shape: Sequence[int] | None = None,
              deterministic: bool = False,
              frames: Sequence[geometry.AxisFrame] | None = None) -> _Plan:
    """The static plan of a call: tile shapes default to `geometry.default_tile_shapes`."""
    q_tile, kv_tile = geometry.default_tile_shapes(tuple(axes), head_dim, arch="xla")
    if frames is None:
        frames = tuple(geometry.AxisFrame.whole(a.length) for a in axes)
    return _Plan(axes=tuple(axes),
                 q_tile=tuple(q_tile_shape) if q_tile_shape is not None else q_tile,
                 kv_tile=tuple(kv_tile_shape) if kv_tile_shape is not None else kv_tile,
                 scale=float(scale), deterministic=bool(deterministic), frames=tuple(frames))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, axes: tuple[AxisParams, ...],
              scale: float, *, q_tile_shape: Sequence[int] | None = None,
              kv_tile_shape: Sequence[int] | None = None,
              deterministic: bool = False,
              frames: Sequence[geometry.AxisFrame] | None = None
              ) -> tuple[jax.Array, jax.Array]:
    """Tiled GNA; the `xla` implementation.

    Args:
      q: ``[B, *spatial, H, D]``; k, v: ``[B, *spatial, H_kv, D]`` (validated by `api`).
      axes: resolved per-axis parameters; scale: score multiplier.
      q_tile_shape, kv_tile_shape: tile shapes in dilation-group indices, one int per axis
        (default `geometry.default_tile_shapes`). The result does not depend on them.
      deterministic: compute ``dk, dv`` without scatter-adds (bitwise reproducible).
      frames: per-axis `geometry.AxisFrame`: q and k/v hold these slabs of the global
        problem `axes` (context parallelism); default: the whole axes.

    Returns:
      ``(out, lse)``: out like q; lse ``[B, *spatial, H]`` float32.
    """
    plan = make_plan(axes, scale, q.shape[-1], q_tile_shape, kv_tile_shape, deterministic,
                     frames)
    out, lse = _attention(q, k, v, plan)
    return out, lse.astype(jnp.float32)
