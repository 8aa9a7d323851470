"""Spatial context parallelism on real GPUs: `sharded_attention` over N devices vs one.

For each problem (bench.PROBLEMS names) and mode it times the jitted single-GPU call and
the jitted call sharded over the first spatial axis on `--devices` GPUs (inputs already laid
out as the call wants them, as in a model whose activations stay sharded), checks that the
two agree, and prints time ratios. Timing uses `bench.time_function` for both sides.

    python benchmarks/context_parallel.py --problem hunyuan-gna hunyuan-na --devices 2
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jax_gna import bench, context_parallel
from jax_gna.context_parallel import sharded_attention


def _agreement(a, b) -> float:
    """Largest |a - b| relative to the largest |b| (float32)."""
    a, b = (np.asarray(jnp.asarray(x, jnp.float32)) for x in (a, b))
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", nargs="+", default=["hunyuan-gna", "hunyuan-na"])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--mode", nargs="+", default=["fwd", "fwd+bwd"])
    parser.add_argument("--implementation", default="cuda")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    devices = jax.devices()[:args.devices]
    if len(devices) < args.devices:
        raise SystemExit(f"need {args.devices} devices, found {len(jax.devices())}")
    mesh = Mesh(np.array(devices), ("sp",))
    rows = []
    for name in args.problem:
        problem = bench.get_problem(name)
        rank = len(problem.spatial_shape)
        plan = context_parallel.plan_halo(problem.cfg.resolve(problem.spatial_shape), 0,
                                          args.devices)
        spec = NamedSharding(mesh, PartitionSpec(None, "sp", *([None] * (rank + 1))))
        single_in = jax.device_put(bench.make_inputs(problem), devices[0])
        sharded_in = jax.device_put(single_in, spec)
        for mode in args.mode:
            single = bench.gna_function(problem, args.implementation, mode)
            sharded = bench._with_grad(
                lambda q, k, v: sharded_attention(q, k, v, problem.cfg, mesh=mesh,
                                                  axis_name="sp",
                                                  implementation=args.implementation), mode)
            want, got = single(*single_in), sharded(*sharded_in)
            want, got = jax.tree.leaves(want), jax.tree.leaves(got)
            err = max(_agreement(g, w) for g, w in zip(got, want))
            t1 = bench.time_function(single, single_in, reps=args.reps,
                                     min_time=args.min_time)["seconds"]
            tn = bench.time_function(sharded, sharded_in, reps=args.reps,
                                     min_time=args.min_time)["seconds"]
            rows.append(dict(problem=name, mode=mode, devices=args.devices,
                             halo=(plan.left, plan.right), gather=plan.gather,
                             single_ms=t1 * 1e3, sharded_ms=tn * 1e3, ratio=tn / t1,
                             rel_err=err, device=devices[0].device_kind))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"{'problem':14} {'mode':8} {'halo':>8} {'1 GPU ms':>9} "
          f"{args.devices} GPUs ms  ratio  rel.err")
    for r in rows:
        print(f"{r['problem']:14} {r['mode']:8} {str(r['halo']):>8} {r['single_ms']:9.2f} "
              f"{r['sharded_ms']:10.2f} {r['ratio']:6.3f}  {r['rel_err']:.1e}")


if __name__ == "__main__":
    main()
