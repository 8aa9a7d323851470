"""Spatial context parallelism: one video's attention split over devices along time.

Runs on whatever devices JAX has. On a CPU-only machine it asks XLA for 4 host devices
(set before JAX starts), so the example also shows the mechanics without GPUs.

    python examples/context_parallel.py [--devices N] [--implementation cuda|cpu|xla]

It shards a ``[B, T, H, W, heads, D]`` video over the time axis, runs
`jax_gna.sharded_attention` (each device exchanges only K/V halos with its neighbours),
checks forward and gradients against single-device `jax_gna.attention`, and prints the
halo each device receives.
"""

from __future__ import annotations

import argparse
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Only affects the CPU platform; must happen before JAX initialises its backends.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=4").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import jax_gna  # noqa: E402
from jax_gna import context_parallel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=None, help="default: all (at most 4)")
    parser.add_argument("--implementation", default=None)
    args = parser.parse_args()

    n = args.devices or min(4, len(jax.devices()))
    mesh = Mesh(np.array(jax.devices()[:n]), ("time",))
    # A small video: 24 frames of 12x20 tokens; window 5x5x5, stride 2 in time, causal time.
    cfg = jax_gna.GNAConfig(kernel_size=(5, 5, 5), stride=(2, 1, 1),
                            is_causal=(True, False, False))
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (2, 24, 12, 20, 4, 64), jnp.float32).astype(dtype)
               for kk in keys)

    # Activations of a context-parallel model already live sharded along time.
    layout = NamedSharding(mesh, P(None, "time", None, None, None, None))
    q, k, v = jax.device_put((q, k, v), layout)

    attend = jax.jit(lambda q, k, v: jax_gna.sharded_attention(
        q, k, v, cfg, mesh=mesh, axis_name="time", implementation=args.implementation))
    out = attend(q, k, v)

    plan = context_parallel.plan_halo(cfg.resolve((24, 12, 20)), 0, n)
    if plan.gather:
        print(f"{n} devices, {plan.slab} frames each: windows reach past a neighbour, so "
              "K/V are all-gathered along time")
    else:
        print(f"{n} devices, {plan.slab} frames each; every device receives {plan.left} "
              f"frames from its predecessor and {plan.right} from its successor")
    print(f"output sharding: {out.sharding.spec}")

    single = lambda q, k, v: jax_gna.attention(q, k, v, cfg,
                                               implementation=args.implementation)
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32)
                                - single(q, k, v).astype(jnp.float32))))
    print(f"max |sharded - single-device| = {err:.3g}")

    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) ** 2)
    g_sharded = jax.jit(jax.grad(loss(attend), argnums=(0, 1, 2)))(q, k, v)
    g_single = jax.grad(loss(single), argnums=(0, 1, 2))(q, k, v)
    gerr = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
               for a, b in zip(g_sharded, g_single))
    print(f"max |grad sharded - grad single-device| = {gerr:.3g}")
    tol = 5e-2 if dtype == jnp.bfloat16 else 1e-4
    print(f"agrees: {err < tol and gerr < tol * 10}")


if __name__ == "__main__":
    main()
