"""Analytical GNA simulator and block-sparse configuration finder.

`simulate` predicts, for one problem and one pair of tile shapes, how much work a tiled kernel
does: the FLOP-wise speedup over dense attention, the tile-level speedup under the kernels'
Q-tile -> KV-tile-box rule, and whether the problem is *perfectly block-sparse* (no visited
tile holds an in-bounds element the mask removes, so no FLOP is wasted on masked scores).
`find_configs` searches window/stride settings near a request for perfectly block-sparse ones.

Everything is computed from `jax_gna.geometry` (window bounds and per-axis tilings); no window
arithmetic lives here. All quantities factorise over spatial axes, so a 3-D problem costs
three 1-D computations.

Definitions (per multi-dimensional tile pair of one dilation-group combination):

* *visited*: visible on every axis (`geometry.AxisTiling.visible`); the kernels visit exactly
  these pairs.
* *full*: full on every axis (`AxisTiling.full`): every valid query sees every key and the KV
  tile holds no padding; such a pair runs without mask code.
* *partial*: visited but not full; it runs the element-wise mask (for masked scores, for
  padding, or both).
* *masked*: visited and some valid query of the Q tile does not see some valid (in-bounds)
  key of the KV tile. A pair that is partial only because its tiles stick out of the axis
  (padding) is *not* masked: its in-bounds elements are all needed.
* *block-sparse*: no visited pair is masked. With tile shapes that divide the group lengths
  (no padding) this is exactly ``tile_speedup == flop_speedup``.
* *dense tile pairs*: ``tile_count(q_tile) * tile_count(kv_tile)`` over the padded group
  layout (`geometry.tile_count`), i.e. what a dense kernel with the same tiles would visit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import numpy as np

from jax_gna import geometry
from jax_gna.config import AxisParams, GNAConfig


@dataclasses.dataclass(frozen=True)
class SimResult:
    """What a tiled kernel does on one GNA problem (see the module docstring for terms).

    Attributes:
      spatial_shape: the token layout.
      q_tile_shape, kv_tile_shape: tile shapes (group indices per axis) the result is for.
      tokens: ``N = prod(spatial_shape)``.
      neighborhood_size: ``Σ_queries |neighbourhood|`` (the GNA score count).
      flop_speedup: ``N² / neighborhood_size`` (the FLOP-wise bound).
      dense_tile_pairs: tile pairs a dense kernel with the same tiles visits (= total tiles).
      visited_tiles, full_tiles, partial_tiles, masked_tiles: tile-pair counts.
      tile_speedup: ``dense_tile_pairs / visited_tiles``.
      partial_fraction: ``partial_tiles / visited_tiles``.
      block_sparse: ``masked_tiles == 0``.
    """

    spatial_shape: tuple[int, ...]
    q_tile_shape: tuple[int, ...]
    kv_tile_shape: tuple[int, ...]
    tokens: int
    neighborhood_size: int
    flop_speedup: float
    dense_tile_pairs: int
    visited_tiles: int
    full_tiles: int
    partial_tiles: int
    masked_tiles: int
    tile_speedup: float
    partial_fraction: float
    block_sparse: bool

    @property
    def total_tiles(self) -> int:
        """Alias of `dense_tile_pairs`."""
        return self.dense_tile_pairs

    @property
    def sparsity(self) -> float:
        """Fraction of the dense ``N²`` scores that GNA skips."""
        return 1.0 - self.neighborhood_size / self.tokens ** 2

    def summary(self) -> str:
        """A few human-readable lines (what ``python -m jax_gna sim`` prints)."""
        shape = "x".join(map(str, self.spatial_shape))
        return "\n".join([
            f"tokens            {self.tokens} ({shape})",
            f"tiles             Q {self.q_tile_shape}  KV {self.kv_tile_shape}",
            f"FLOP-wise speedup {self.flop_speedup:.3f}x  (sparsity {self.sparsity:.4f})",
            f"tile speedup      {self.tile_speedup:.3f}x  "
            f"({self.visited_tiles} of {self.dense_tile_pairs} tile pairs visited)",
            f"full / partial    {self.full_tiles} / {self.partial_tiles}  "
            f"(partial fraction {self.partial_fraction:.4f}; masked {self.masked_tiles})",
            f"block-sparse      {'yes' if self.block_sparse else 'no'}",
        ])


class _AxisStats(NamedTuple):
    """Per-axis counts, summed over the axis' dilation groups (they multiply across axes)."""

    neighborhood: int   # Σ over queries of keys seen on this axis
    q_tiles: int        # Q tiles over the padded group layout
    kv_tiles: int       # KV tiles over the padded group layout
    visited: int        # visible (Q tile, KV tile) pairs
    full: int           # full pairs
    clean: int          # visible pairs without a masked in-bounds element


def _clean(tiling: geometry.AxisTiling) -> np.ndarray:
    """``[n_q, n_kv]``: every valid query of the Q tile sees every valid key of the KV tile.

    Like `AxisTiling.full` but padding keys (beyond the group length) do not count.
    """
    length = tiling.length
    first = np.arange(tiling.n_q) * tiling.q_tile
    last = np.minimum(first + tiling.q_tile, length) - 1
    start, end = geometry.window_bounds(np.stack([first, last]), length, tiling.kernel,
                                        tiling.stride, tiling.causal)
    key_first = np.arange(tiling.n_kv) * tiling.kv_tile
    key_stop = np.minimum(key_first + tiling.kv_tile, length)
    # Window starts and ends are non-decreasing in the query index, so the last query has the
    # largest start and the first query the smallest end.
    return (start[1][:, None] <= key_first[None, :]) & (end[0][:, None] >= key_stop[None, :])


def _axis_stats(axis: AxisParams, q_tile: int, kv_tile: int) -> _AxisStats:
    tilings = geometry.group_tilings(axis, q_tile, kv_tile)
    full = clean = 0
    for n_groups, tiling in tilings:
        full += n_groups * int(tiling.full.sum())
        clean += n_groups * int((tiling.visible & _clean(tiling)).sum())
    return _AxisStats(
        neighborhood=geometry.neighborhood_size([axis]),
        q_tiles=geometry.tile_count([axis], (q_tile,)),
        kv_tiles=geometry.tile_count([axis], (kv_tile,)),
        visited=geometry.visible_pairs(tilings), full=full, clean=clean)


def _combine(spatial_shape: tuple[int, ...], q_tile: tuple[int, ...],
             kv_tile: tuple[int, ...], stats: Sequence[_AxisStats]) -> SimResult:
    tokens = math.prod(spatial_shape)
    nbhd = math.prod(s.neighborhood for s in stats)
    dense = math.prod(s.q_tiles * s.kv_tiles for s in stats)
    visited = math.prod(s.visited for s in stats)
    full = math.prod(s.full for s in stats)
    clean = math.prod(s.clean for s in stats)
    return SimResult(
        spatial_shape=tuple(spatial_shape), q_tile_shape=tuple(q_tile),
        kv_tile_shape=tuple(kv_tile), tokens=tokens, neighborhood_size=nbhd,
        flop_speedup=tokens ** 2 / nbhd, dense_tile_pairs=dense, visited_tiles=visited,
        full_tiles=full, partial_tiles=visited - full, masked_tiles=visited - clean,
        tile_speedup=dense / visited, partial_fraction=(visited - full) / visited,
        block_sparse=visited == clean)


def _tiles(axes: Sequence[AxisParams], q_tile_shape, kv_tile_shape, head_dim: int,
           arch: str, planned: bool = False) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The overrides, else `cuda`'s defaults for the problem, or (`planned`) the tiles that
    block-sparse configurations are planned for (the first of `geometry.tile_menu`)."""
    rank = len(axes)
    q_tile = geometry.check_tile_shape("q_tile_shape", q_tile_shape, rank)
    kv_tile = geometry.check_tile_shape("kv_tile_shape", kv_tile_shape, rank)
    if q_tile is None or kv_tile is None:
        dq, dkv = (geometry.tile_menu(axes, head_dim, arch)[0] if planned
                   else geometry.default_tile_shapes(axes, head_dim, arch))
        q_tile = dq if q_tile is None else q_tile
        kv_tile = dkv if kv_tile is None else kv_tile
    return q_tile, kv_tile


def _check_shape(spatial_shape) -> tuple[int, ...]:
    try:
        shape = tuple(spatial_shape)
    except TypeError:
        raise TypeError(f"spatial_shape must be a sequence of ints, got {spatial_shape!r}")
    if not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in shape):
        raise TypeError(f"spatial_shape={shape} must hold ints")
    return tuple(int(n) for n in shape)


def simulate(spatial_shape: Sequence[int], cfg: GNAConfig, *,
             q_tile_shape: Sequence[int] | None = None,
             kv_tile_shape: Sequence[int] | None = None, head_dim: int = 128,
             arch: str = "sm80") -> SimResult:
    """Predicts the work of a tiled GNA kernel on one problem.

    Args:
      spatial_shape: token layout, 1 to 3 axes.
      cfg: the `GNAConfig`.
      q_tile_shape, kv_tile_shape: tile shapes in group indices (one int per axis); default to
        what `implementation="cuda"` uses (`geometry.default_tile_shapes`).
      head_dim, arch: select the default tiles.

    Returns:
      A `SimResult`. Exact (integer counts); cost is a few small per-axis matrices.

    Raises:
      ValueError: invalid config for the shape, bad tile shapes or an unknown `arch`.
      TypeError: `cfg` is not a `GNAConfig` or the shape is not ints.
    """
    if not isinstance(cfg, GNAConfig):
        raise TypeError(f"cfg must be a jax_gna.GNAConfig, got {type(cfg).__name__}")
    shape = _check_shape(spatial_shape)
    axes = cfg.resolve(shape)
    q_tile, kv_tile = _tiles(axes, q_tile_shape, kv_tile_shape, head_dim, arch)
    stats = [_axis_stats(a, tq, tk) for a, tq, tk in zip(axes, q_tile, kv_tile)]
    return _combine(shape, q_tile, kv_tile, stats)


# ----------------------------------------------------------------------------------------
# Configuration finder.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FoundConfig:
    """One block-sparse configuration returned by `find_configs`.

    Attributes:
      config: the `GNAConfig` (per-axis tuples).
      distance: how far it is from the request (0 = exactly what was asked).
      result: its `SimResult` (``result.block_sparse`` is True).
    """

    config: GNAConfig
    distance: float
    result: SimResult

    @property
    def window(self) -> tuple[int, ...]:
        return self.config.kernel_size

    @property
    def stride(self) -> tuple[int, ...]:
        return self.config.stride


def _per_axis(name: str, value, rank: int, allow_none: bool = True) -> tuple | None:
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} is required")
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank
    if len(items) != rank:
        raise ValueError(f"{name}={value!r} must have one entry per spatial axis ({rank})")
    return items


#: Largest (candidate x Q tile) count the per-axis search evaluates at once.
_CHUNK = 1 << 22
#: Largest number of (window, stride) pairs searched on one axis.
_MAX_PAIRS = 1 << 25


def _uniform_windows(group_len: int, causal: bool, q_tile: int, kv_tile: int,
                     kernels: np.ndarray, strides: np.ndarray, q_tiles: np.ndarray) -> np.ndarray:
    """``[n_pairs]``: the listed Q tiles are clean for each (kernel, stride) pair.

    A Q tile is clean (no visited KV tile holds an in-bounds key it masks) iff all its queries
    share one window ``[start, end)`` with `start` on a KV-tile boundary and `end` on a
    boundary or at the group's end. (If two queries' starts differ, the key at the smaller start
    is seen by one and not the other, and its KV tile is visited; if `start` is not on a
    boundary, key ``start - 1`` sits in a visited tile and nobody sees it; likewise for ends.)
    Only a fast filter: `_axis_stats` decides.
    """
    first = q_tiles * q_tile
    last = np.minimum(first + q_tile, group_len) - 1
    k, s = kernels[:, None], strides[:, None]
    s0, e0 = geometry.window_bounds(first[None, :], group_len, k, s, causal)
    s1, e1 = geometry.window_bounds(last[None, :], group_len, k, s, causal)
    ok = (s0 == s1) & (e0 == e1) & (s0 % kv_tile == 0) & ((e0 % kv_tile == 0)
                                                          | (e0 == group_len))
    return ok.all(axis=1)


def _window_range(max_k: int, axis_length: int, window: int | None, stride: int | None,
                  target_density: float | None) -> range:
    """Windows searched on one axis: [w/2, 2w] around the requested (or implied) window."""
    if window is not None:
        want = max_k if window == -1 else window
    elif target_density is not None:
        want = max(2, round(target_density * axis_length))
    else:
        return range(max(2, stride or 2), max_k + 1)
    return range(max(2, want // 2), min(max_k, 2 * want) + 1)


def _axis_candidates(axis_length: int, dilation: int, causal: bool, q_tile: int,
                     kv_tile: int, window: int | None, stride: int | None,
                     target_density: float | None) -> list[tuple[float, int, int, _AxisStats]]:
    """Block-sparse ``(distance, k, s, stats)`` on one axis, nearest first."""
    max_k = axis_length // dilation
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or not (
                window == -1 or 2 <= window <= max_k):
            raise ValueError(f"window={window!r} must be an int in [2, {max_k}] (or -1) on an "
                             f"axis of length {axis_length} with dilation {dilation}")
    kernels = np.array(_window_range(max_k, axis_length, window, stride, target_density))
    n_pairs = int(kernels.sum())
    if n_pairs > _MAX_PAIRS:
        raise ValueError(f"an axis of length {axis_length} has {n_pairs} (window, stride) "
                         "pairs to search; request a window (or target_sparsity) to narrow it")
    pair_k = np.repeat(kernels, kernels).astype(np.int32)
    pair_s = (np.arange(n_pairs) - np.repeat(np.cumsum(kernels) - kernels, kernels)
              + 1).astype(np.int32)
    group_lens = sorted({geometry.group_length(axis_length, dilation, g)
                         for g in range(dilation)})
    for lg in group_lens:
        q_tiles = np.arange(-(-lg // q_tile))
        # Samples of Q tiles first (cheap: interior tiles reject most pairs), then all.
        mid = len(q_tiles) // 2
        samples = (np.unique(np.clip([mid - 1, mid], 0, None)),
                   np.unique(np.linspace(0, len(q_tiles) - 1, 16).round().astype(int)),
                   q_tiles)
        for tiles in samples:
            step = max(1, _CHUNK // len(tiles))
            keep = np.concatenate([
                _uniform_windows(lg, causal, q_tile, kv_tile, pair_k[i:i + step],
                                 pair_s[i:i + step], tiles)
                for i in range(0, len(pair_k), step)] or [np.zeros(0, bool)])
            pair_k, pair_s = pair_k[keep], pair_s[keep]
    out = []
    for k, s in zip(pair_k.tolist(), pair_s.tolist()):
        axis = AxisParams(length=axis_length, kernel=k, stride=s, dilation=dilation,
                          causal=causal)
        st = _axis_stats(axis, q_tile, kv_tile)
        if st.clean != st.visited:  # the exact rule has the last word
            continue
        dist = 0.0
        if window is not None:
            want_k = max_k if window == -1 else window
            dist += abs(k - want_k) / want_k
        if stride is not None:
            dist += abs(s - stride) / stride
        if target_density is not None:
            dist += abs(math.log(st.neighborhood / axis_length ** 2 / target_density))
        out.append((dist, k, s, st))
    out.sort(key=lambda c: (c[0], c[3].visited, c[2]))
    return out


def find_configs(spatial_shape: Sequence[int], *, window: int | Sequence[int] | None = None,
                 stride: int | Sequence[int] | None = None,
                 target_sparsity: float | None = None,
                 q_tile_shape: Sequence[int] | None = None,
                 kv_tile_shape: Sequence[int] | None = None, top: int = 10,
                 dilation: int | Sequence[int] = 1,
                 is_causal: bool | Sequence[bool] = False, head_dim: int = 128,
                 arch: str = "sm80") -> list[FoundConfig]:
    """Perfectly block-sparse (window, stride) configurations near a request.

    Block-sparseness is a per-axis property (a multi-dimensional pair is masked iff it is
    masked on some axis), so each axis is searched on its own over every window
    ``2 <= k <= L // d`` and stride ``1 <= s <= k``; the nearest per-axis candidates are then
    combined.

    Distance to the request is the sum over axes of ``|k - window| / window`` and
    ``|s - stride| / stride`` (for the parts given), plus ``|log(density / target density)|``
    when `target_sparsity` is given (density = 1 - sparsity = fraction of dense scores kept).
    Results are sorted by distance, then by higher tile speedup, then by smaller stride
    (closer to neighbourhood attention).

    Args:
      spatial_shape: token layout, 1 to 3 axes.
      window, stride: requested per-axis values (scalars broadcast); ``window=-1`` is the
        whole axis.
      target_sparsity: requested fraction of dense scores skipped, in (0, 1).
      q_tile_shape, kv_tile_shape, head_dim, arch: tiles, as in `simulate`, except that the
        default is the first candidate of `geometry.tile_menu`. The `cuda` implementation
        picks it for the configurations found where its tiles divide the group lengths:
        those visit only needed elements, the fewest pairs any tiles of their sizes can.
      top: how many configurations to return.
      dilation, is_causal: kept fixed at these values.

    Returns:
      Up to `top` `FoundConfig`, best first (empty if none is block-sparse).

    Raises:
      ValueError: nothing requested (window, stride and target_sparsity all None), values out
        of range, or bad tile shapes.
    """
    shape = _check_shape(spatial_shape)
    rank = len(shape)
    if not 1 <= rank <= 3:
        raise ValueError(f"spatial_shape={shape} must have 1 to 3 axes")
    if window is None and stride is None and target_sparsity is None:
        raise ValueError("find_configs needs window, stride or target_sparsity")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top={top!r} must be a positive int")
    windows = _per_axis("window", window, rank)
    strides = _per_axis("stride", stride, rank)
    dilations = _per_axis("dilation", dilation, rank, allow_none=False)
    causals = _per_axis("is_causal", is_causal, rank, allow_none=False)
    target_density = None
    if target_sparsity is not None:
        if not 0.0 < float(target_sparsity) < 1.0:
            raise ValueError(f"target_sparsity={target_sparsity} must be in (0, 1)")
        target_density = (1.0 - float(target_sparsity)) ** (1.0 / rank)
    # Validate dilations (and get the planned tiles) through the one config validator, with
    # the smallest legal window.
    axes = GNAConfig(kernel_size=2, stride=1, dilation=tuple(dilations),
                     is_causal=tuple(causals)).resolve(shape)
    q_tile, kv_tile = _tiles(axes, q_tile_shape, kv_tile_shape, head_dim, arch, planned=True)
    for a, s in enumerate(strides or ()):
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"stride[{a}]={s!r} must be a positive int")
    per_axis = []
    for a in range(rank):
        cands = _axis_candidates(shape[a], dilations[a], causals[a], q_tile[a], kv_tile[a],
                                 None if windows is None else windows[a],
                                 None if strides is None else strides[a], target_density)
        if not cands:
            return []
        per_axis.append(cands[:max(4 * top, 32)])
    return _rank_combinations(shape, q_tile, kv_tile, dilations, causals, per_axis,
                              target_sparsity, top)


def _rank_combinations(shape, q_tile, kv_tile, dilations, causals, per_axis,
                       target_sparsity, top) -> list[FoundConfig]:
    """Scores every combination of the per-axis candidates (vectorised) and keeps `top`."""
    grids = np.meshgrid(*[np.arange(len(c)) for c in per_axis], indexing="ij")
    idx = [g.ravel() for g in grids]
    dist = np.zeros(idx[0].shape)
    visited = np.ones(idx[0].shape)
    nbhd = np.ones(idx[0].shape)
    strides = np.zeros(idx[0].shape)
    for a, cands in enumerate(per_axis):
        col = lambda f: np.array([f(c) for c in cands])[idx[a]]  # noqa: E731
        visited *= col(lambda c: c[3].visited)
        nbhd *= col(lambda c: c[3].neighborhood)
        strides += col(lambda c: c[2])
        if target_sparsity is None:
            dist += col(lambda c: c[0])
        else:
            # The density term is not additive over axes: recompute it for the whole config.
            dist += col(lambda c: c[0] - abs(math.log(
                c[3].neighborhood / shape[a] ** 2
                / (1.0 - target_sparsity) ** (1.0 / len(shape)))))
    if target_sparsity is not None:
        density = nbhd / float(math.prod(shape)) ** 2
        dist += np.abs(np.log(density / (1.0 - target_sparsity)))
    dist = np.round(dist, 9)
    order = np.lexsort((strides, visited, dist))[:top]
    out = []
    for i in order:
        picks = [per_axis[a][idx[a][i]] for a in range(len(shape))]
        cfg = GNAConfig(kernel_size=tuple(p[1] for p in picks),
                        stride=tuple(p[2] for p in picks), dilation=tuple(dilations),
                        is_causal=tuple(causals))
        stats = [p[3] for p in picks]
        out.append(FoundConfig(cfg, float(dist[i]),
                               _combine(shape, q_tile, kv_tile, stats)))
    return out


# ----------------------------------------------------------------------------------------
# Token map (what `python -m jax_gna draw` shows).
# ----------------------------------------------------------------------------------------

def token_map(spatial_shape: Sequence[int], cfg: GNAConfig, query: Sequence[int], *,
              q_tile_shape: Sequence[int] | None = None,
              kv_tile_shape: Sequence[int] | None = None, head_dim: int = 128,
              arch: str = "sm80") -> dict[str, np.ndarray]:
    """Per token, how the kernels treat it from the point of view of one query.

    Args:
      spatial_shape, cfg, q_tile_shape, kv_tile_shape, head_dim, arch: as in `simulate`.
      query: coordinates of the query (one int per axis).

    Returns:
      Boolean arrays of shape `spatial_shape`:
      ``neighborhood`` (keys the query sees), ``q_tile`` (queries of its Q tile),
      ``visited`` (keys in the KV tiles its Q tile visits) and ``full`` (keys in visited KV
      tiles that run without a mask).

    Raises:
      ValueError: the query is out of range, or as in `simulate`.
    """
    shape = _check_shape(spatial_shape)
    axes = cfg.resolve(shape)
    query = tuple(query)
    if len(query) != len(shape) or not all(
            isinstance(i, (int, np.integer)) and 0 <= i < n for i, n in zip(query, shape)):
        raise ValueError(f"query={query} must be {len(shape)} ints inside {shape}")
    q_tile, kv_tile = _tiles(axes, q_tile_shape, kv_tile_shape, head_dim, arch)
    per_axis: dict[str, list[np.ndarray]] = {n: [] for n in
                                            ("neighborhood", "q_tile", "visited", "full")}
    for axis, i, tq, tk in zip(axes, query, q_tile, kv_tile):
        d = axis.dilation
        tiling = geometry.axis_tiling(geometry.group_length(axis.length, d, i % d),
                                      axis.kernel, axis.stride, axis.causal, tq, tk)
        j = np.arange(axis.length)
        same_group = j % d == i % d
        qt, kt = (i // d) // tq, np.minimum((j // d) // tk, tiling.n_kv - 1)
        per_axis["neighborhood"].append(geometry.axis_mask(i, j, axis))
        per_axis["q_tile"].append(same_group & ((j // d) // tq == qt))
        per_axis["visited"].append(same_group & tiling.visible[qt, kt])
        per_axis["full"].append(same_group & tiling.full[qt, kt])
    out = {}
    for name, masks in per_axis.items():
        m = np.ones((), bool)
        for a, ma in enumerate(masks):
            m = m[..., None] & ma.reshape((1,) * a + (-1,))
        out[name] = m
    return out
