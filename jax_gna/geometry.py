"""GNA semantics and tile geometry: the one place that says which keys a query sees.

Everything else (the reference mask, the `xla` path, the simulator, the native handlers'
launch parameters) calls into this module. The C++ header `cuda/gna_geometry.h` is a port of
the same arithmetic for the kernels; a test checks the two agree tile for tile.

Coordinates. On an axis of length ``L`` with dilation ``d``, token ``i`` belongs to dilation
group ``g = i % d`` at index ``ii = i // d``; group ``g`` holds ``Lg = ceil((L - g) / d)``
tokens. A key ``j`` can be seen only by queries of its own group, and windows are defined on
group indices. Dilation therefore splits each axis into independent sub-axes: tiles are laid
over group indices, never over raw coordinates.

Tiles. A tile is a box of ``tile[a]`` group indices per axis. Because window starts and ends
are non-decreasing in the query index, the keys seen by a Q tile on one axis form one
contiguous range, and a multi-dimensional Q tile sees exactly the product of its per-axis
ranges. Per axis we therefore only need two boolean matrices over (Q tile, KV tile):
``visible`` (some query of the Q tile sees some key of the KV tile) and ``full`` (every valid
query sees every key, and the KV tile holds no padding). A multi-dimensional tile pair is
visited iff it is visible on every axis, and needs no element mask iff it is full on every axis.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import numpy as np

from jax_gna.config import AxisParams, GNAConfig


# ----------------------------------------------------------------------------------------
# Per-axis window arithmetic (element level). `xp` is numpy or jax.numpy: the same formulas
# serve host-side geometry and traced masks.
# ----------------------------------------------------------------------------------------

def group_length(length: int, dilation: int, group: int) -> int:
    """Number of tokens of dilation group `group` on an axis of `length` tokens."""
    return (length - group + dilation - 1) // dilation


def window_bounds(ii: Any, group_len: Any, kernel: int, stride: int, causal: bool, xp=np):
    """Window ``[start, end)`` (group indices) of the query at group index `ii`.

    Non-causal: the stride group's leader ``lead = min(ii // s * s + s // 2, Lg - 1)`` is
    centred, and the window is shifted inward at borders (``k`` keys always).
    Causal: ``lead = min(ii // s * s + s - 1, Lg - 1)``, the window starts at
    ``max(lead - k + 1, 0)`` and ends at the query itself.
    """
    base = (ii // stride) * stride
    if causal:
        lead = xp.minimum(base + stride - 1, group_len - 1)
        start = xp.maximum(lead - kernel + 1, 0)
        end = ii + 1
    else:
        lead = xp.minimum(base + stride // 2, group_len - 1)
        start = xp.clip(lead - kernel // 2, 0, group_len - kernel)
        end = start + kernel
    return start, end


def axis_mask(i: Any, j: Any, axis: AxisParams, xp=np):
    """Whether query coordinate `i` sees key coordinate `j` on one axis (broadcasts)."""
    d = axis.dilation
    g = i % d
    ii, jj = i // d, j // d
    start, end = window_bounds(ii, (axis.length - g + d - 1) // d, axis.kernel, axis.stride,
                               axis.causal, xp)
    return (j % d == g) & (jj >= start) & (jj < end)


def neighborhood_mask(spatial_shape: Sequence[int], cfg: GNAConfig) -> np.ndarray:
    """Boolean ``[N, N]`` mask (row: query, column: key) in row-major token order.

    For teaching and debugging small layouts; it is quadratic in the number of tokens.
    """
    return axes_mask(cfg.resolve(tuple(spatial_shape)))


def axes_mask(axes: Sequence[AxisParams],
              frames: Sequence["AxisFrame"] | None = None) -> np.ndarray:
    """Boolean ``[N_q, N_kv]`` mask over row-major tokens of the (framed) Q and K/V buffers.

    Without frames both are the whole token grid. K/V rows outside the axis are never seen.
    """
    mask = np.ones((1, 1), dtype=bool)
    for a, axis in enumerate(axes):
        frame = frames[a] if frames is not None else AxisFrame.whole(axis.length)
        i = np.arange(frame.q_length) + frame.q_offset
        j = np.arange(frame.kv_length) + frame.kv_offset
        # Keys outside [0, L) have group indices outside [0, Lg), so no window holds them.
        m = axis_mask(i[:, None], j[None, :], axis)
        # Row-major: the earlier axis is the slower one.
        mask = (mask[:, None, :, None] & m[None, :, None, :]).reshape(
            mask.shape[0] * m.shape[0], mask.shape[1] * m.shape[1])
    return mask


def neighborhood_size(axes: Sequence[AxisParams]) -> int:
    """Σ over queries of the number of keys each query sees (the FLOP count's core)."""
    total = 1
    for axis in axes:
        per_axis = 0
        for g in range(axis.dilation):
            lg = group_length(axis.length, axis.dilation, g)
            ii = np.arange(lg)
            start, end = window_bounds(ii, lg, axis.kernel, axis.stride, axis.causal)
            per_axis += int(np.sum(end - start))
        total *= per_axis
    return total


def dense_equivalent(axes: Sequence[AxisParams]) -> bool:
    """True iff every query sees every key (plain self-attention)."""
    return all(a.kernel == a.length and not a.causal and a.dilation == 1 for a in axes)


# ----------------------------------------------------------------------------------------
# Per-axis tile geometry.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AxisTiling:
    """Tile geometry of one (dilation-group) axis of `length` group indices.

    Attributes:
      kv_lo, kv_hi: ``[n_q]`` KV-tile range ``[kv_lo, kv_hi)`` seen by each Q tile.
      q_lo, q_hi: ``[n_kv]`` Q-tile range that sees each KV tile (the backward's loop).
      visible: ``[n_q, n_kv]`` some query of the Q tile sees some key of the KV tile.
      full: ``[n_q, n_kv]`` every valid query of the Q tile sees every key of the KV tile
        and the KV tile has no padding; implies `visible`.
    """

    length: int
    kernel: int
    stride: int
    causal: bool
    q_tile: int
    kv_tile: int
    kv_lo: np.ndarray
    kv_hi: np.ndarray
    q_lo: np.ndarray
    q_hi: np.ndarray
    visible: np.ndarray
    full: np.ndarray

    @property
    def n_q(self) -> int:
        return self.kv_lo.shape[0]

    @property
    def n_kv(self) -> int:
        return self.q_lo.shape[0]


@functools.lru_cache(maxsize=512)
def axis_tiling(length: int, kernel: int, stride: int, causal: bool, q_tile: int,
                kv_tile: int, q_offset: int = 0, q_len: int | None = None,
                kv_offset: int = 0, kv_len: int | None = None) -> AxisTiling:
    """Builds the `AxisTiling` of one group axis (cached; arrays must not be mutated).

    Windows are those of a group axis of `length` indices. The tiles cover a *frame* of it:
    Q tiles cover group indices ``[q_offset, q_offset + q_len)`` and KV tiles cover
    ``[kv_offset, kv_offset + kv_len)`` (by default both are the whole axis). The KV frame
    may reach past either end of the axis; every window of the Q frame must lie inside it
    (see `check_frame`). All indices in the result are local to the frames.
    """
    q_len = length if q_len is None else q_len
    kv_len = length if kv_len is None else kv_len
    n_q = -(-q_len // q_tile)
    n_kv = -(-kv_len // kv_tile)
    ii = np.arange(q_len) + q_offset
    start, end = window_bounds(ii, length, kernel, stride, causal)
    start, end = start - kv_offset, end - kv_offset          # into the KV frame
    first = np.arange(n_q) * q_tile                          # first query of each Q tile
    last = np.minimum(first + q_tile, q_len) - 1             # last valid query
    kv_lo = start[first] // kv_tile
    kv_hi = -(-end[last] // kv_tile)
    kt = np.arange(n_kv)
    visible = (kt[None, :] >= kv_lo[:, None]) & (kt[None, :] < kv_hi[:, None])
    key_first = kt * kv_tile
    key_end = key_first + kv_tile
    full = ((key_end[None, :] <= kv_len)
            & (start[last][:, None] <= key_first[None, :])
            & (end[first][:, None] >= key_end[None, :]))
    # Inverse: Q tiles whose key range meets the KV tile. `visible` has contiguous rows and
    # columns (ranges are monotone), so first/last True per column give the range.
    any_col = visible.any(axis=0)
    q_lo = np.where(any_col, visible.argmax(axis=0), 0)
    q_hi = np.where(any_col, n_q - visible[::-1].argmax(axis=0), 0)
    for arr in (kv_lo, kv_hi, q_lo, q_hi, visible, full):
        arr.setflags(write=False)
    return AxisTiling(length, kernel, stride, causal, q_tile, kv_tile, kv_lo, kv_hi, q_lo,
                      q_hi, visible, full)


# ----------------------------------------------------------------------------------------
# Frames: a local slab of queries and of keys/values inside a global axis (context
# parallelism). Token-level; offsets are multiples of the dilation so that a local token's
# dilation group is its global one.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AxisFrame:
    """Which global positions of one axis the local Q and K/V buffers hold.

    Q holds ``[q_offset, q_offset + q_length)``, which must lie inside ``[0, L)``. K/V hold
    ``[kv_offset, kv_offset + kv_length)``, which may reach past either border: those rows
    are padding that no query sees (their gradients are zero).
    """

    q_offset: int
    q_length: int
    kv_offset: int
    kv_length: int

    @staticmethod
    def whole(length: int) -> "AxisFrame":
        return AxisFrame(0, length, 0, length)

    def groups(self, axis: AxisParams, g: int) -> dict[str, int]:
        """The frame of dilation group `g` in group indices (`axis_tiling` keywords)."""
        d = axis.dilation
        return dict(q_offset=self.q_offset // d, q_len=group_length(self.q_length, d, g),
                    kv_offset=self.kv_offset // d, kv_len=group_length(self.kv_length, d, g))


def kv_span(axis: AxisParams, q_start: int, q_end: int) -> tuple[int, int]:
    """Global key range ``[lo, hi)`` (tokens) that the queries ``[q_start, q_end)`` see."""
    if not 0 <= q_start < q_end <= axis.length:
        raise ValueError(f"query range [{q_start}, {q_end}) must be a non-empty part of "
                         f"[0, {axis.length})")
    d = axis.dilation
    lo, hi = axis.length, 0
    for g in range(d):
        lg = group_length(axis.length, d, g)
        first = max(0, -(-(q_start - g) // d))               # first group index >= q_start
        last = (q_end - 1 - g) // d                           # last group index < q_end
        if last < first or first >= lg:
            continue
        s, _ = window_bounds(first, lg, axis.kernel, axis.stride, axis.causal)
        _, e = window_bounds(last, lg, axis.kernel, axis.stride, axis.causal)
        lo, hi = min(lo, int(s) * d + g), max(hi, (int(e) - 1) * d + g + 1)
    return lo, hi


def check_frame(axis: AxisParams, frame: AxisFrame, name: str = "frame") -> None:
    """Raises ValueError unless `frame` is valid on `axis` (see `AxisFrame`)."""
    d = axis.dilation
    if frame.q_offset % d or frame.kv_offset % d:
        raise ValueError(f"{name}: q_offset={frame.q_offset} and kv_offset={frame.kv_offset} "
                         f"must be multiples of the dilation {d}")
    if frame.q_length < 1 or frame.kv_length < 1:
        raise ValueError(f"{name}: q_length and kv_length must be positive")
    if frame.q_offset < 0 or frame.q_offset + frame.q_length > axis.length:
        raise ValueError(f"{name}: queries [{frame.q_offset}, "
                         f"{frame.q_offset + frame.q_length}) must lie inside [0, "
                         f"{axis.length})")
    lo, hi = kv_span(axis, frame.q_offset, frame.q_offset + frame.q_length)
    if lo < frame.kv_offset or hi > frame.kv_offset + frame.kv_length:
        raise ValueError(f"{name}: the queries' windows need keys [{lo}, {hi}) but the K/V "
                         f"frame holds [{frame.kv_offset}, "
                         f"{frame.kv_offset + frame.kv_length})")


def group_tilings(axis: AxisParams, q_tile: int, kv_tile: int,
                  frame: AxisFrame | None = None) -> list[tuple[int, AxisTiling]]:
    """``(number of dilation groups, tiling)`` for each distinct group geometry of `axis`.

    Without a frame at most two distinct ones exist (``L // d`` and ``ceil(L / d)``). They
    are sorted so that the last one has the most Q and KV tiles.
    """
    counts: dict[tuple, int] = {}
    for g in range(axis.dilation):
        lg = group_length(axis.length, axis.dilation, g)
        sub = frame.groups(axis, g) if frame is not None else {}
        key = (lg, tuple(sorted(sub.items())))
        counts[key] = counts.get(key, 0) + 1
    tilings = [(n, axis_tiling(lg, axis.kernel, axis.stride, axis.causal, q_tile, kv_tile,
                               **dict(sub)))
               for (lg, sub), n in counts.items()]
    return sorted(tilings, key=lambda nt: (nt[1].n_q, nt[1].n_kv, nt[1].length))


def padded_group_tiling(axis: AxisParams, q_tile: int, kv_tile: int,
                        frame: AxisFrame | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(visible, full)`` over tiles of the longest group, valid for every group.

    For implementations that pad every dilation group to ``ceil(L / d)`` and process them
    together: a tile pair is visited if any group needs it, and runs unmasked only if it is
    full in every group. Exact (no extra visits) when `d` divides `L`.
    """
    tilings = [t for _, t in group_tilings(axis, q_tile, kv_tile, frame)]
    longest = tilings[-1]
    visible = np.zeros_like(longest.visible)
    full = np.ones_like(longest.full)
    for t in tilings:
        v = np.zeros_like(visible)
        f = np.zeros_like(full)
        v[:t.n_q, :t.n_kv] = t.visible
        f[:t.n_q, :t.n_kv] = t.full
        # Q tiles that exist only in longer groups are free to be whatever the others say.
        rows = np.arange(visible.shape[0]) < t.n_q
        visible |= v
        full &= np.where(rows[:, None], f, True)
    full &= visible
    return visible, full


# ----------------------------------------------------------------------------------------
# Tile shapes.
# ----------------------------------------------------------------------------------------

def check_tile_shape(name: str, tile: Sequence[int] | None, rank: int) -> tuple[int, ...] | None:
    """Validates an expert tile-shape override (one positive int per spatial axis)."""
    if tile is None:
        return None
    tile = tuple(tile)
    if len(tile) != rank or not all(isinstance(t, (int, np.integer)) and t >= 1 for t in tile):
        raise ValueError(f"{name}={tile} must be {rank} positive ints (one per spatial axis)")
    return tuple(int(t) for t in tile)


def fit_tile(tile: Sequence[int], axes: Sequence[AxisParams]) -> tuple[int, ...]:
    """Shrinks a tile so that it is no larger than the (longest group of each) axis.

    The volume moves to the other axes where possible, so that short axes do not leave the
    tile mostly empty: an axis that gets smaller hands its factor to the largest axis.
    """
    longest = [group_length(a.length, a.dilation, 0) for a in axes]
    out = list(tile)
    for a in range(len(out)):
        while out[a] > 1 and out[a] // 2 >= longest[a]:
            out[a] //= 2
            others = [b for b in range(len(out)) if b != a and out[b] * 2 <= longest[b]]
            if others:
                b = max(others, key=lambda b: longest[b] / out[b])
                out[b] *= 2
    return tuple(out)


def tile_count(axes: Sequence[AxisParams], tile: Sequence[int]) -> int:
    """Number of tiles over the padded group layout (all dilation groups)."""
    return math.prod(a.dilation * -(-group_length(a.length, a.dilation, 0) // t)
                     for a, t in zip(axes, tile))


def visited_pairs(axis: AxisParams, q_tile: int, kv_tile: int) -> int:
    """Visible (Q tile, KV tile) pairs on one axis, summed over its dilation groups.

    A multi-dimensional pair is visited iff it is visible on every axis, so the pairs a kernel
    visits are the product of these over the axes (`visited_tile_pairs`).
    """
    return visible_pairs(group_tilings(axis, q_tile, kv_tile))


def visible_pairs(tilings: Sequence[tuple[int, AxisTiling]]) -> int:
    """`visited_pairs` from an axis's `group_tilings` (for callers that also need them)."""
    return sum(n * int(t.visible.sum()) for n, t in tilings)


def visited_tile_pairs(axes: Sequence[AxisParams], q_tile: Sequence[int],
                       kv_tile: Sequence[int]) -> int:
    """(Q tile, KV tile) pairs a tiled kernel visits (the simulator's ``visited_tiles``)."""
    return math.prod(visited_pairs(a, tq, tk) for a, tq, tk in zip(axes, q_tile, kv_tile))


def kv_tiles_divide(axes: Sequence[AxisParams], kv_tile: Sequence[int]) -> bool:
    """Whether `kv_tile` divides every axis's dilation groups, so that every KV tile is a whole
    box of tokens: for a whole (unframed) problem, the condition under which the sm90a forward
    loads K/V as TMA boxes (`kv_tiles_inside` in cuda/gna_geometry.h)."""
    return all(a.length % a.dilation == 0 and a.length // a.dilation % t == 0
               for a, t in zip(axes, kv_tile))


# (Q tile, KV tile) candidates per rank, in group indices; the first of each rank is the one
# `simulator.find_configs` plans block-sparse problems for. Boxes of 128 queries and 64 keys
# for the tensor-core kernels; 2-D/3-D boxes are squat so that a window of w keys per axis
# costs about (w + tile) / tile tiles per axis instead of a thin strip's (w + 128) / 1. No one
# box suits every window. On an H200 (docs/PERFORMANCE.md, 2026-11-29), the candidate with the
# fewest visited pairs ran:
# - 3-D: 1.01-1.49x faster than the first one on five neighbourhood problems (sm90a kernels,
#   forward and backward; sm80 1.06-1.58x on three), and on a strided, partly masked one 0.95x
#   forward and 1.10x backward (sm80 1.2x both);
# - 2-D: 1.07-1.27x forward on three neighbourhood problems (windows 7, 21 and 57; sm80
#   1.05-1.18x), backward 1.00-1.12x (sm80 1.02-1.10x).
_TILE_MENU = {
    "sm80": {1: (((128,), (64,)),),
             2: (((8, 16), (8, 8)), ((8, 16), (4, 16)), ((4, 32), (4, 16))),
             3: (((2, 8, 8), (2, 4, 8)), ((8, 4, 4), (2, 8, 4)), ((4, 8, 4), (4, 4, 4)))},
    # The portable jnp path pays per scan step, not per tensor-core fragment: larger boxes
    # (256 tokens) ran 1.3-2x faster than the sm80 menu on an H200 (2026-11-26).
    "xla": {1: (((256,), (256,)),), 2: (((16, 16), (16, 16)),), 3: (((4, 8, 8), (4, 8, 8)),)},
}

# What a visited pair costs, relative to one whose KV tile divides the axes, where it does
# not: the sm90a forward then gathers K/V rows with cp.async instead of loading TMA boxes,
# measured 12-15 % slower per pair on an H200 (2-D windows of 21 on 72x72 and 120x120, 3-D
# Hunyuan NA; 2026-11-29). The sm80 kernels always gather; this weight only costs them a
# candidate with up to 15 % fewer pairs.
_UNDIVIDED_KV_COST = {"sm80": 1.15, "xla": 1.0}
assert _UNDIVIDED_KV_COST.keys() == _TILE_MENU.keys()


def _check_arch(arch: str) -> None:
    if arch not in _TILE_MENU:
        raise ValueError(f"arch={arch!r} has no tile menu; known: {sorted(_TILE_MENU)}")


def tile_menu(axes: Sequence[AxisParams], head_dim: int = 128,
              arch: str = "sm80") -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The distinct ``(q_tile, kv_tile)`` candidates of `arch` for the rank of `axes`, each
    shrunk to fit short axes (`fit_tile`), in the menu's order.

    `head_dim` is part of the signature because kernels may pick smaller tiles for large head
    dims.

    Raises:
      ValueError: `arch` has no menu.
    """
    _check_arch(arch)
    del head_dim  # one menu for head dims up to 128 so far
    fitted = [(fit_tile(q, axes), fit_tile(kv, axes)) for q, kv in _TILE_MENU[arch][len(axes)]]
    return list(dict.fromkeys(fitted))


def tile_cost(axes: Sequence[AxisParams], q_tile: Sequence[int], kv_tile: Sequence[int],
              arch: str = "sm80") -> float:
    """What `default_tile_shapes` minimises: the visited tile pairs, weighted up where the KV
    tile does not divide the axes (`kv_tiles_divide`; the sm90a forward then gathers K/V
    rows).

    Raises:
      ValueError: `arch` has no menu.
    """
    _check_arch(arch)
    pairs = visited_tile_pairs(axes, q_tile, kv_tile)
    return pairs * (1.0 if kv_tiles_divide(axes, kv_tile) else _UNDIVIDED_KV_COST[arch])


def default_tile_shapes(axes: Sequence[AxisParams], head_dim: int = 128,
                        arch: str = "sm80") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ``(q_tile, kv_tile)`` the `cuda` implementation uses for a problem on `arch`: of
    `tile_menu`'s candidates, the first of least `tile_cost`.

    Raises:
      ValueError: `arch` has no menu.
    """
    menu = tile_menu(axes, head_dim, arch)
    if len(menu) == 1:
        return menu[0]
    return min(menu, key=lambda tiles: tile_cost(axes, *tiles, arch=arch))


# ----------------------------------------------------------------------------------------
# The backward's own tile shapes.
# ----------------------------------------------------------------------------------------

def backward_kv_tile(axes: Sequence[AxisParams], q_tile: Sequence[int],
                     kv_tile: Sequence[int]) -> tuple[int, ...]:
    """The KV box of a 128-row dK/dV CTA of the `cuda` backward: `kv_tile` doubled along the
    fastest axis where it is at most half of `q_tile`, else along the axis with the most KV
    tiles (the fastest of those).

    Mirrors ``with_doubled_kv_tile`` in cuda/backward_tiles.h for whole (unframed) axes.
    """
    doubled = list(kv_tile)
    rank = len(axes)
    axis = next((a for a in reversed(range(rank)) if 2 * kv_tile[a] <= q_tile[a]), None)
    if axis is None:
        tiles = [-(-group_length(a.length, a.dilation, 0) // t) for a, t in zip(axes, kv_tile)]
        axis = max(reversed(range(rank)), key=lambda a: tiles[a])
    doubled[axis] *= 2
    return tuple(doubled)


def backward_kv_rows(axes: Sequence[AxisParams], q_tile: Sequence[int],
                     kv_tile: Sequence[int]) -> int:
    """KV rows per dK/dV CTA of the sm80 family: 128, on `backward_kv_tile`, where doubling
    adds at most 3 % of the (query, key) pairs visited along the doubled axis, else 64, on
    `kv_tile` itself. (The sm90a fused backward always takes 128.)

    Mirrors ``dkdv_rows_128`` in cuda/backward_tiles.h for whole axes; the launch also falls
    back to 64 rows where 128-row CTAs do not fit shared memory (sm_86/89).
    """
    doubled = backward_kv_tile(axes, q_tile, kv_tile)
    a = next(a for a, (d, t) in enumerate(zip(doubled, kv_tile)) if d != t)

    def along(kv: int) -> int:  # (query, key) pairs along axis a, over the Q tile's length
        return visited_pairs(axes[a], q_tile[a], kv) * kv

    return 128 if 100 * along(doubled[a]) <= 103 * along(kv_tile[a]) else 64


# What the backward may take besides the forward's menu. Its 128-row dK/dV CTAs visit pairs
# of Q tiles and doubled KV tiles (`backward_kv_tile`), and no pair of the forward's menu
# doubles into a 16x8 box, say; the lse and O do not depend on the tiles, so the two passes
# may differ. Against the forward's tiles on an H200 (docs/PERFORMANCE.md, 2026-11-29; 24
# heads, D = 128), sm90a backward: 1.07x on FLUX-4K NA and on 128x128 with window 13 (16x8
# CTAs), 1.22x on 16x32x32 with window 7, 1.28x on 8x64x64 with window 7x13x13, 1.58x on
# 16x64x64 with window 13.
_BACKWARD_EXTRA_TILES = {
    "sm80": {1: (),
             2: (((8, 16), (16, 4)), ((4, 32), (8, 8))),
             3: (((16, 2, 4), (8, 2, 4)), ((16, 2, 4), (16, 4, 1)), ((8, 2, 8), (4, 2, 8)))},
    "xla": {1: (), 2: (), 3: ()},
}
assert _BACKWARD_EXTRA_TILES.keys() == _TILE_MENU.keys()

# A visited pair of the sm80 family's 64-row dK/dV CTAs (128 queries x 64 keys) against one
# of its 128-row CTAs (128 x 128): fit on an H200 (2026-11-29) to four problems, whose
# backward times under two tile pairs each it then predicted within 6 %.
_SM80_64_ROW_PAIR_COST = 0.53
# The backward leaves the forward's tiles only for a cost at least 5 % lower: the cost
# overstated the measured gains by up to 8 % (docs/PERFORMANCE.md, 2026-11-29), so a smaller
# predicted gain may be none.
_BACKWARD_MIN_GAIN = 0.95
BACKWARD_KERNELS = ("sm90a", "sm80")


def backward_tile_cost(axes: Sequence[AxisParams], q_tile: Sequence[int],
                       kv_tile: Sequence[int], kernels: str = "sm90a") -> float:
    """What `backward_tile_shapes` minimises: the pairs of Q tiles and KV boxes that the `cuda`
    backward's dK/dV CTAs of `kernels` ("sm90a" or "sm80") visit, in 128-row CTA pairs.

    Raises:
      ValueError: unknown `kernels`.
    """
    if kernels not in BACKWARD_KERNELS:
        raise ValueError(f"kernels={kernels!r} must be one of {BACKWARD_KERNELS}")
    if kernels == "sm90a" or backward_kv_rows(axes, q_tile, kv_tile) == 128:
        return float(visited_tile_pairs(axes, q_tile, backward_kv_tile(axes, q_tile, kv_tile)))
    return _SM80_64_ROW_PAIR_COST * visited_tile_pairs(axes, q_tile, kv_tile)


def backward_tile_shapes(axes: Sequence[AxisParams], head_dim: int = 128, arch: str = "sm80",
                         deterministic: bool = False, kernels: str = "sm90a"
                         ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ``(q_tile, kv_tile)`` of the `cuda` backward on `kernels` ("sm90a" or "sm80"): of the
    forward's pick (`default_tile_shapes`), the forward's menu and the backward's extra
    candidates, the first of least `backward_tile_cost`, where that is at least 5 % below the
    forward pick's cost; else the forward's pick.

    The deterministic backward (64-row dK/dV CTAs on the KV tile itself, then dQ by Q tiles)
    and the ``xla`` path take the forward's tiles.

    Raises:
      ValueError: `arch` has no menu, or unknown `kernels`.
    """
    if kernels not in BACKWARD_KERNELS:  # also where the forward's tiles are returned below
        raise ValueError(f"kernels={kernels!r} must be one of {BACKWARD_KERNELS}")
    forward = default_tile_shapes(axes, head_dim, arch)
    extras = [(fit_tile(q, axes), fit_tile(kv, axes))
              for q, kv in _BACKWARD_EXTRA_TILES[arch][len(axes)]]
    if deterministic or not extras:
        return forward

    def cost(tiles):
        return backward_tile_cost(axes, *tiles, kernels=kernels)

    candidates = list(dict.fromkeys([forward, *tile_menu(axes, head_dim, arch), *extras]))
    best = min(candidates, key=cost)
    return best if cost(best) <= _BACKWARD_MIN_GAIN * cost(forward) else forward
