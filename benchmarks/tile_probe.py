"""Times one named problem's `cuda` GNA under several (Q tile, KV tile) shapes in one process,
next to what the simulator counts for each, to see which count predicts the time.

Each candidate is timed as `python -m jax_gna bench` times a contestant (the jitted call a
user makes, `bench.time_function`), in the modes asked for; cuDNN dense is timed once per mode
for the ratio. Candidates alternate over ``--rounds`` so that the card's clock drifts evenly.

Usage (GPU): ``python3 benchmarks/tile_probe.py --problem hunyuan-na
--tiles 2,8,8/2,4,8 8,4,4/2,8,4``, or an ad-hoc problem with ``--shape 16 32 32 --window 7
--stride 1`` instead of ``--problem``. Tiles are fitted to short axes (`geometry.fit_tile`), as
the defaults are.
"""

from __future__ import annotations

import argparse

from jax_gna import api, bench, geometry, simulator
from jax_gna.config import GNAConfig


def _tiles(text: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    q, kv = text.split("/")
    return tuple(int(x) for x in q.split(",")), tuple(int(x) for x in kv.split(","))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problem", help="a name from jax_gna.bench.PROBLEMS")
    p.add_argument("--shape", type=int, nargs="+", help="ad-hoc problem: spatial shape")
    p.add_argument("--window", type=int, nargs="+", help="ad-hoc problem: window")
    p.add_argument("--stride", type=int, nargs="+", default=[1], help="ad-hoc problem: stride")
    p.add_argument("--heads", type=int, default=24, help="ad-hoc problem: heads")
    p.add_argument("--tiles", nargs="+", required=True, metavar="Q/KV",
                   help="candidates as q0,q1,.../kv0,kv1,...")
    p.add_argument("--mode", nargs="+", default=["fwd"], choices=bench.MODES)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--min-time", type=float, default=0.3)
    args = p.parse_args()
    if args.problem:
        problem = bench.get_problem(args.problem)
    else:
        rank = len(args.shape)
        cfg = GNAConfig(tuple(args.window) * (rank // len(args.window)),
                        tuple(args.stride) * (rank // len(args.stride)))
        problem = bench.Problem("x".join(map(str, args.shape)) + f"-w{args.window}-s{args.stride}",
                                tuple(args.shape), cfg, heads=args.heads)
    axes = problem.cfg.resolve(problem.spatial_shape)
    cands = [tuple(geometry.fit_tile(t, axes) for t in _tiles(text)) for text in args.tiles]
    inputs = bench.make_inputs(problem)

    def timed(f, mode: str) -> float:
        fn, fn_args = bench.prepare_call(f, mode, inputs)
        return bench.time_function(fn, fn_args, reps=args.reps, min_time=args.min_time)["seconds"]

    def gna(q_tile, kv_tile):
        return lambda q, k, v: api.attention(q, k, v, problem.cfg, implementation="cuda",
                                             q_tile_shape=q_tile, kv_tile_shape=kv_tile)

    dense = {m: timed(bench._dense_forward(problem, "cudnn"), m) for m in args.mode}
    times: dict[tuple, list[float]] = {}
    for _ in range(args.rounds):
        for c in cands:
            for m in args.mode:
                times.setdefault((c, m), []).append(timed(gna(*c), m))
    print(f"{problem.name}: cuDNN dense " +
          ", ".join(f"{m} {dense[m] * 1e3:.3f} ms" for m in args.mode))
    print(f"{'Q tile':>12} {'KV tile':>12} {'visited':>8} {'partial':>7} {'mode':>7} "
          f"{'ms (rounds)':>24} {'x dense':>8} {'eff TF/s':>8}")
    for c in cands:
        sim = simulator.simulate(problem.spatial_shape, problem.cfg, q_tile_shape=c[0],
                                 kv_tile_shape=c[1])
        for m in args.mode:
            ts = times[(c, m)]
            best = min(ts)
            print(f"{str(c[0]):>12} {str(c[1]):>12} {sim.visited_tiles:>8} "
                  f"{sim.partial_fraction:>7.3f} {m:>7} "
                  f"{' '.join(f'{t * 1e3:.3f}' for t in ts):>24} {dense[m] / best:>8.2f} "
                  f"{problem.gna_flops(m) / best / 1e12:>8.1f}")


if __name__ == "__main__":
    main()
