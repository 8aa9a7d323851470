"""How well the L2 cache serves the Hopper backward's Q-side traffic, per tile-walk order.

A model, not a measurement: the fused backward (cuda/sm90/backward_fused_ws.cuh) runs one
CTA per doubled KV tile (128 rows) on each of `--ctas` SMs. Each CTA reads its K/V tile once,
then, per step, one 64-row chunk of a Q tile that sees it: Q and dO (bf16) and a
float32 dQ reduction. The model interleaves the CTAs in flight one step at a time, starts a
CTA's successor (in walk order) when it finishes, and keeps an LRU cache of `--l2-mb` of
whole chunks. It prints, per order of the axes (slowest first), the hit rate and the DRAM
bytes per head (misses plus write-backs of dQ).

On Hunyuan GNA it gave 71 % hits for axis 0 slowest, against 69.5 % measured by ncu, and
95 % for the order that `tile_walk_strides` (cuda/gna_geometry.h) picks, axis 2 slowest.

Usage: python benchmarks/l2_walk_model.py [--problem hunyuan-gna] [--l2-mb 40]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import math

from jax_gna import bench, geometry

ROWS_PER_STEP = 64
KV_ROWS = 128


def _doubled_kv_tile(axes, q_tile, kv_tile):
    """The fused backward's KV tile, by the rule of the host's with_doubled_kv_tile
    (cuda/sm90/backward_impl.cuh): doubled along the fastest axis where it is at most half
    the Q tile, else along the axis with the most KV tiles (the fastest of equals)."""
    out = list(kv_tile)
    half = [a for a in reversed(range(len(out))) if 2 * out[a] <= q_tile[a]]
    if half:
        axis = half[0]
    else:
        tiles = [-(-geometry.group_length(ax.length, ax.dilation, 0) // t)
                 for ax, t in zip(axes, kv_tile)]
        axis = max(reversed(range(len(out))), key=lambda a: tiles[a])
    out[axis] *= 2
    return tuple(out)


def model(problem: bench.Problem, order: tuple[int, ...], ctas: int, l2_bytes: float,
          heads: int = 3) -> tuple[float, float]:
    """(hit rate, DRAM GB per head) of the backward's walk with axes nested as `order`."""
    axes = problem.cfg.resolve(problem.spatial_shape)
    q_tile, kv_tile = geometry.default_tile_shapes(axes, arch="sm80")
    kv_tile = _doubled_kv_tile(axes, q_tile, kv_tile)
    tilings = [geometry.axis_tiling(a.length, a.kernel, a.stride, a.causal, qt, kt)
               for a, qt, kt in zip(axes, q_tile, kv_tile)]
    chunks = math.prod(q_tile) // ROWS_PER_STEP
    d = problem.head_dim
    sizes = {"q": ROWS_PER_STEP * d * 2, "do": ROWS_PER_STEP * d * 2,
             "dq": ROWS_PER_STEP * d * 4, "kv": KV_ROWS * d * 2 * 2}

    def steps(kv):
        boxes = [range(t.q_lo[c], t.q_hi[c]) for t, c in zip(tilings, kv)]
        return [(q, c) for q in itertools.product(*boxes) for c in range(chunks)]

    n = [t.n_kv for t in tilings]
    walk = []
    for coords in itertools.product(*(range(n[a]) for a in order)):
        tile = [0] * len(n)
        for a, c in zip(order, coords):
            tile[a] = c
        walk.append(tuple(tile))
    work = iter([(h, kv) for h in range(heads) for kv in walk])

    cache: collections.OrderedDict = collections.OrderedDict()
    used = hits = total = written_back = 0

    def touch(key, dirty=False):
        nonlocal used, hits, total, written_back
        size = sizes[key[0]]
        total += size
        if key in cache:
            hits += size
            cache.move_to_end(key)
            cache[key] = cache[key] or dirty
            return
        cache[key] = dirty
        used += size
        while used > l2_bytes:
            old, old_dirty = cache.popitem(last=False)
            used -= sizes[old[0]]
            written_back += sizes[old[0]] if old_dirty else 0

    def start():
        item = next(work, None)
        return None if item is None else [item, steps(item[1]), 0]

    active = [c for c in (start() for _ in range(ctas)) if c is not None]
    while active:
        running = []
        for cta in active:
            (h, kv), todo, i = cta
            if i == 0:
                touch(("kv", h, kv))
            q, c = todo[i]
            touch(("q", h, q, c))
            touch(("do", h, q, c))
            touch(("dq", h, q, c), dirty=True)
            cta[2] += 1
            nxt = cta if cta[2] < len(todo) else start()
            if nxt is not None:
                running.append(nxt)
        active = running
    return hits / total, (total - hits + written_back) / 1e9 / heads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="hunyuan-gna", choices=sorted(bench.PROBLEMS))
    parser.add_argument("--l2-mb", type=float, default=40.0,
                        help="L2 the model may use (the card has 50 MB; default 40)")
    parser.add_argument("--ctas", type=int, default=132, help="CTAs in flight (SMs)")
    args = parser.parse_args()
    problem = bench.PROBLEMS[args.problem]
    rank = len(problem.spatial_shape)
    for order in itertools.permutations(range(rank)):
        hit, dram = model(problem, order, args.ctas, args.l2_mb * 1e6)
        print(f"{args.problem}: axes {order} (slowest first): L2 hits {hit:.1%}, "
              f"DRAM {dram:.2f} GB per head")


if __name__ == "__main__":
    main()
