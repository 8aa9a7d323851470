"""Times the GNA forward over a family of windows, to split its time per Q tile into a part
per visited KV step and a part per tile (start-up, epilogue).

Every problem is the same token layout and stride with a growing window, so the Q tiles and
their count stay fixed while the KV steps per tile grow. A line fitted through (steps per
tile, µs per tile round) gives both parts: the slope is the time of one step, the intercept
what each tile costs besides its steps.

Usage (GPU): ``python3 benchmarks/window_sweep.py --shape 256 256 --stride 16 16
--windows 48 80 144 208``.
"""

from __future__ import annotations

import argparse
import math

import jax
import numpy as np

from jax_gna import bench, simulator
from jax_gna.config import GNAConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs="+", required=True)
    p.add_argument("--stride", type=int, nargs="+", required=True)
    p.add_argument("--windows", type=int, nargs="+", required=True,
                   help="window edge per problem (the same along every axis)")
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--tiles-per-step", type=int, default=2,
                   help="KV tiles per step of the kernel (sm90a, D = 128: 2)")
    args = p.parse_args()
    rank = len(args.shape)
    sms = getattr(jax.devices()[0], "core_count", 132)
    rows = []
    for w in args.windows:
        cfg = GNAConfig((w,) * rank, tuple(args.stride))
        problem = bench.Problem(f"w{w}", tuple(args.shape), cfg, heads=args.heads)
        sim = simulator.simulate(problem.spatial_shape, cfg)  # the cuda tiles
        kv_tiles = problem.tokens // math.prod(sim.kv_tile_shape)
        q_tiles = sim.dense_tile_pairs // kv_tiles  # per head
        steps = sim.visited_tiles / q_tiles / args.tiles_per_step
        rounds = math.ceil(q_tiles * args.heads / sms)
        fn = bench.gna_function(problem, "cuda", "fwd")
        timing = bench.time_function(fn, bench.make_inputs(problem), reps=5, min_time=0.3)
        seconds = timing["seconds"]
        rows.append((w, steps, seconds * 1e6 / rounds, problem.gna_flops("fwd") / seconds))
    print(f"{q_tiles * args.heads} Q tiles on {sms} SMs: {rounds} rounds")
    print(f"{'window':>7} {'steps/tile':>10} {'us/round':>9} {'TF/s':>6}")
    for w, steps, us, flops in rows:
        print(f"{w:7d} {steps:10.1f} {us:9.2f} {flops / 1e12:6.0f}")
    slope, intercept = np.polyfit([r[1] for r in rows], [r[2] for r in rows], 1)
    print(f"fit: {slope:.3f} us per step, {intercept:.2f} us per tile besides its steps")


if __name__ == "__main__":
    main()
