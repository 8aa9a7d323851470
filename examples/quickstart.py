"""jax_gna in five minutes: the config object, the functional API, extra tokens, the simulator.

Run:  python examples/quickstart.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jax_gna


def config_object() -> None:
    print("== 1. The config object")
    # One value per spatial axis, or a scalar broadcast to every axis.
    cfg = jax_gna.GNAConfig(kernel_size=(7, 7), stride=(2, 2), dilation=1, is_causal=False)
    for a, axis in enumerate(cfg.resolve((32, 32))):
        print(f"  axis {a}: {axis}")
    try:
        jax_gna.GNAConfig(kernel_size=4, stride=5).resolve((16,))
    except ValueError as err:  # errors name the parameter and the rule
        print(f"  invalid config -> ValueError: {err}")
    # The neighbourhood of a small 1-D layout: row = query, column = key.
    mask = jax_gna.neighborhood_mask((10,), jax_gna.GNAConfig(kernel_size=4, stride=2))
    print("  1-D, window 4, stride 2 (queries in pairs share a window):")
    for row in mask:
        print("    " + "".join("#" if m else "." for m in row))


def functional_api() -> None:
    print("== 2. The functional API")
    print(f"  implementations here, best first: {jax_gna.available_implementations()}")
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    shape = (2, 16, 16, 4, 32)                       # [B, H_img, W_img, heads, head_dim]
    q = jax.random.normal(kq, shape)
    k = jax.random.normal(kk, shape)
    v = jax.random.normal(kv, shape)
    cfg = jax_gna.GNAConfig(kernel_size=(5, 7), stride=(1, 2))

    attend = jax.jit(jax_gna.attention, static_argnums=3,
                     static_argnames=("implementation", "return_lse"))
    out, lse = attend(q, k, v, cfg, return_lse=True)          # best available implementation
    ref = attend(q, k, v, cfg, implementation="reference")
    print(f"  out {out.shape} {out.dtype}, lse {lse.shape} {lse.dtype}; "
          f"max |out - reference| = {float(jnp.max(jnp.abs(out - ref))):.2e}")

    # NATTEN-style entry points are thin wrappers over the same call.
    out2 = jax_gna.na2d(q, k, v, kernel_size=(5, 7), stride=(1, 2))
    print(f"  na2d agrees: {bool(jnp.allclose(out, out2, atol=1e-5))}")

    # Gradients flow through every implementation (custom VJPs underneath).
    grad_q = jax.jit(jax.grad(lambda q: jnp.sum(attend(q, k, v, cfg) ** 2)))(q)
    print(f"  d/dq of sum(out^2): shape {grad_q.shape}, |grad| = "
          f"{float(jnp.linalg.norm(grad_q)):.3f}")


def additional_tokens() -> None:
    print("== 3. Extra tokens (e.g. text) attended by every query, merged through LSEs")
    keys = jax.random.split(jax.random.key(1), 5)
    q, k, v = (jax.random.normal(kk, (1, 12, 12, 2, 16)) for kk in keys[:3])
    text_k, text_v = (jax.random.normal(kk, (1, 8, 2, 16)) for kk in keys[3:])
    cfg = jax_gna.GNAConfig(kernel_size=5)
    joint = jax_gna.attention(q, k, v, cfg, additional_keys=text_k, additional_values=text_v)
    # The same thing by hand: GNA and dense-over-text, merged exactly.
    gna_out, gna_lse = jax_gna.attention(q, k, v, cfg, return_lse=True)
    s = jnp.einsum("bxyhd,bshd->bxyhs", q, text_k) * 16 ** -0.5
    text_out = jnp.einsum("bxyhs,bshd->bxyhd", jax.nn.softmax(s, -1), text_v)
    text_lse = jax.nn.logsumexp(s, axis=-1)
    by_hand, _ = jax_gna.merge_attentions([gna_out, text_out], [gna_lse, text_lse])
    print(f"  joint attention {joint.shape}; equals GNA ⊕ dense-text merge: "
          f"{bool(jnp.allclose(joint, by_hand, atol=1e-5))}")


def simulator() -> None:
    print("== 4. The simulator: what a tiled kernel would do, without running it")
    video = jax_gna.simulate((30, 48, 80), jax_gna.GNAConfig((18, 24, 24), stride=(16, 8, 8)))
    print("  HunyuanVideo-shaped 30x48x80, window 18x24x24, stride 16x8x8:")
    print("\n".join("    " + line for line in video.summary().splitlines()))
    na = jax_gna.simulate((30, 48, 80), jax_gna.GNAConfig((18, 24, 24)))
    print(f"  same window with stride 1 (NA): FLOP-wise {na.flop_speedup:.2f}x, "
          f"tile-level {na.tile_speedup:.2f}x, block-sparse: {na.block_sparse}")
    found = jax_gna.find_configs((30, 48, 80), window=(18, 24, 24), stride=(16, 8, 8), top=3)
    print("  nearest perfectly block-sparse configurations:")
    for f in found:
        print(f"    window {f.window} stride {f.stride}: "
              f"{f.result.tile_speedup:.2f}x tile speedup")


def main() -> None:
    np.set_printoptions(precision=3)
    print(f"jax {jax.__version__} on {jax.default_backend()}, jax_gna {jax_gna.__version__}")
    config_object()
    functional_api()
    additional_tokens()
    simulator()


if __name__ == "__main__":
    main()
