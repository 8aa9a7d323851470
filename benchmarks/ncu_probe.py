"""Runs one forward call a few times, for a profiler to catch its kernel.

Usage (on the GPU machine): ``ncu -k regex:... --launch-skip 1 -c 1 python3
benchmarks/ncu_probe.py --contestant cuda --shape 256 256 --window 256 256``. The first call
compiles and warms up; the profiler skips it. ``--contestant cudnn`` runs dense
`jax.nn.dot_product_attention(implementation="cudnn")` on the same inputs instead.
"""

from __future__ import annotations

import argparse

import jax

from jax_gna import bench
from jax_gna.config import GNAConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contestant", choices=("cuda", "cudnn"), required=True)
    p.add_argument("--shape", type=int, nargs="+", required=True)
    p.add_argument("--window", type=int, nargs="+", required=True)
    p.add_argument("--stride", type=int, nargs="+")
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--calls", type=int, default=3)
    args = p.parse_args()
    cfg = GNAConfig(tuple(args.window), tuple(args.stride) if args.stride else 1)
    problem = bench.Problem("probe", tuple(args.shape), cfg, heads=args.heads)
    if args.contestant == "cuda":
        fn = bench.gna_function(problem, "cuda", "fwd")
    else:
        fn = bench.dense_function(problem, "cudnn", "fwd")
    q, k, v, ct = bench.make_inputs(problem)
    for _ in range(args.calls):
        jax.block_until_ready(fn(q, k, v, ct))


if __name__ == "__main__":
    main()
