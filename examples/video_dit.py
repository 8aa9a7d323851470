"""A HunyuanVideo-shaped (or FLUX-shaped) diffusion-transformer block stack: dense vs GNA.

Each block is a dual-stream MM-DiT block (as in HunyuanVideo's and FLUX's double-stream
blocks): video (or image) tokens and text tokens have their own adaLN modulation, QKV,
QK-RMSNorm, output projection and MLP, and attend jointly:

* dense baseline: every token attends to every video+text token
  (`jax.nn.dot_product_attention`, cuDNN on GPU);
* GNA: video tokens attend to their GNA neighbourhood plus all text tokens
  (`jax_gna.attention(..., additional_keys=text_k, additional_values=text_v)`), and text
  tokens attend densely to every token, as in the dense model.

Weights are random; only the latency matters. The script reports the per-step forward latency
of the stack, the time of the joint attention call alone at the same shapes, the share of the
step spent in attention, the attention speedup, the end-to-end speedup, and Amdahl bounds:
``1 / ((1 - f) + f / s)`` with ``f`` the dense attention share and ``s`` the attention speedup
(the FLOP-wise one, and the measured one).

Run:  python examples/video_dit.py --small           (CPU-sized smoke run)
      python examples/video_dit.py --out video.json  (30x48x80 video + 256 text, GPU)
      python examples/video_dit.py --layout flux     (256x256 image + 512 text tokens)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jax_gna
from jax_gna import geometry

# ----------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """The problem: token layout, model width and the GNA configurations to compare."""

    name: str
    spatial: tuple[int, ...]
    text: int
    heads: int
    head_dim: int
    blocks: int
    window: tuple[int, ...]
    stride: tuple[int, ...]
    mlp_ratio: int = 4
    batch: int = 1

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def tokens(self) -> int:
        return math.prod(self.spatial)

    def configs(self) -> dict[str, jax_gna.GNAConfig]:
        """The GNA variants: the strided config of DESIGN.md §4 and stride-1 NA."""
        return {"gna": jax_gna.GNAConfig(self.window, stride=self.stride),
                "na": jax_gna.GNAConfig(self.window, stride=1)}


LAYOUTS = {
    # HunyuanVideo 720p: 30x48x80 latent tokens, 256 text tokens, 24 heads x 128.
    "video": Layout("video", (30, 48, 80), 256, 24, 128, 4, (18, 24, 24), (16, 8, 8)),
    # FLUX at 4K-ish: 256x256 image tokens, 512 text tokens, 24 heads x 128.
    "flux": Layout("flux", (256, 256), 512, 24, 128, 4, (80, 80), (16, 16)),
}
SMALL = {
    "video": Layout("video-small", (6, 8, 8), 16, 2, 16, 2, (3, 4, 4), (3, 2, 2)),
    "flux": Layout("flux-small", (16, 16), 16, 2, 16, 2, (5, 5), (4, 4)),
}


# ----------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------


def rope_tables(spatial: tuple[int, ...], head_dim: int, theta: float = 256.0):
    """Multi-axis rotary tables ``cos, sin: [*spatial, head_dim // 2]`` (float32).

    The rotated half of the head dim is split across axes (HunyuanVideo splits 128 as
    16/56/56; here evenly, remainder to the first axis).
    """
    half = head_dim // 2
    per_axis = [half // len(spatial)] * len(spatial)
    per_axis[0] += half - sum(per_axis)
    angles = []
    for axis, (length, n) in enumerate(zip(spatial, per_axis)):
        freqs = theta ** (-np.arange(n) / max(n, 1))
        ang = np.arange(length)[:, None] * freqs[None, :]
        shape = [1] * len(spatial) + [n]
        shape[axis] = length
        angles.append(np.broadcast_to(ang.reshape(shape), (*spatial, n)))
    ang = np.concatenate(angles, axis=-1)
    return jnp.asarray(np.cos(ang), jnp.float32), jnp.asarray(np.sin(ang), jnp.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on ``x [B, *spatial, H, D]`` with tables ``[*spatial, D/2]``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    c, s = cos[..., None, :], sin[..., None, :]
    return jnp.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1).astype(x.dtype)


class Stream(nnx.Module):
    """One modality's weights in a dual-stream block: adaLN, QKV, QK-norm, proj, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dtype, rngs: nnx.Rngs):
        lin = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.heads = heads
        self.mod = nnx.Linear(dim, 6 * dim, kernel_init=nnx.initializers.normal(0.02), **lin)
        self.norm1 = nnx.LayerNorm(dim, use_scale=False, use_bias=False, epsilon=1e-6,
                                   dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.qkv = nnx.Linear(dim, 3 * dim, **lin)
        self.q_norm = nnx.RMSNorm(dim // heads, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.k_norm = nnx.RMSNorm(dim // heads, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, **lin)
        self.norm2 = nnx.LayerNorm(dim, use_scale=False, use_bias=False, epsilon=1e-6,
                                   dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.fc1 = nnx.Linear(dim, mlp_ratio * dim, **lin)
        self.fc2 = nnx.Linear(mlp_ratio * dim, dim, **lin)

    def modulation(self, vec: jax.Array, ndim: int) -> list[jax.Array]:
        """Six ``[B, 1.., C]`` tensors: shift/scale/gate for attention and for the MLP."""
        mods = self.mod(nnx.silu(vec))
        mods = mods.reshape(mods.shape[0], *([1] * (ndim - 2)), mods.shape[-1])
        return jnp.split(mods, 6, axis=-1)

    def qkv_heads(self, x: jax.Array, shift, scale):
        h = self.norm1(x) * (1 + scale) + shift
        q, k, v = jnp.split(self.qkv(h), 3, axis=-1)
        heads = lambda t: t.reshape(*t.shape[:-1], self.heads, -1)  # noqa: E731
        return self.q_norm(heads(q)), self.k_norm(heads(k)), heads(v)

    def finish(self, x, attn, gate1, shift2, scale2, gate2):
        x = x + gate1 * self.proj(attn.reshape(*attn.shape[:-2], -1))
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.fc2(nnx.gelu(self.fc1(h), approximate=True))


# attention_fn(vq, vk, vv, tq, tk, tv) -> (video_out, text_out); video [B,*spatial,H,D],
# text [B,S,H,D].
JointAttention = Callable[..., tuple[jax.Array, jax.Array]]


class DoubleStreamBlock(nnx.Module):
    def __init__(self, layout: Layout, dtype, rngs: nnx.Rngs):
        self.video = Stream(layout.dim, layout.heads, layout.mlp_ratio, dtype, rngs)
        self.text = Stream(layout.dim, layout.heads, layout.mlp_ratio, dtype, rngs)

    def __call__(self, vid, txt, vec, rope, attention: JointAttention):
        v_mod = self.video.modulation(vec, vid.ndim)
        t_mod = self.text.modulation(vec, txt.ndim)
        vq, vk, vv = self.video.qkv_heads(vid, v_mod[0], v_mod[1])
        tq, tk, tv = self.text.qkv_heads(txt, t_mod[0], t_mod[1])
        if rope is not None:
            vq, vk = apply_rope(vq, *rope), apply_rope(vk, *rope)
        v_attn, t_attn = attention(vq, vk, vv, tq, tk, tv)
        vid = self.video.finish(vid, v_attn, *v_mod[2:])
        txt = self.text.finish(txt, t_attn, *t_mod[2:])
        return vid, txt


class DiTStack(nnx.Module):
    def __init__(self, layout: Layout, dtype, rngs: nnx.Rngs):
        self.blocks = nnx.List([DoubleStreamBlock(layout, dtype, rngs)
                                for _ in range(layout.blocks)])

    def __call__(self, vid, txt, vec, rope, attention: JointAttention):
        for block in self.blocks:
            vid, txt = block(vid, txt, vec, rope, attention)
        return vid, txt


# ----------------------------------------------------------------------------------------
# Joint attention variants
# ----------------------------------------------------------------------------------------


def _flat(x):
    return x.reshape(x.shape[0], -1, *x.shape[-2:])


def dense_attention(dense_impl: str) -> JointAttention:
    """Every video and text token attends to all video+text tokens."""

    def attention(vq, vk, vv, tq, tk, tv):
        q, k, v = (jnp.concatenate([_flat(a), b], axis=1) for a, b in
                   ((vq, tq), (vk, tk), (vv, tv)))
        out = jax.nn.dot_product_attention(q, k, v, implementation=dense_impl)
        n = math.prod(vq.shape[1:-2])
        return out[:, :n].reshape(vq.shape), out[:, n:]

    return attention


def gna_attention(cfg: jax_gna.GNAConfig, implementation: str | None,
                  dense_impl: str) -> JointAttention:
    """Video queries: GNA neighbourhood + all text tokens. Text queries: all tokens."""

    def attention(vq, vk, vv, tq, tk, tv):
        v_out = jax_gna.attention(vq, vk, vv, cfg, implementation=implementation,
                                  additional_keys=tk, additional_values=tv)
        k = jnp.concatenate([_flat(vk), tk], axis=1)
        v = jnp.concatenate([_flat(vv), tv], axis=1)
        t_out = jax.nn.dot_product_attention(tq, k, v, implementation=dense_impl)
        return v_out, t_out

    return attention


def attention_flops(layout: Layout, cfg: jax_gna.GNAConfig | None) -> float:
    """Forward FLOPs of one joint attention call (``4·B·H·D`` per score)."""
    n, s = layout.tokens, layout.text
    if cfg is None:
        scores = (n + s) ** 2
    else:
        scores = geometry.neighborhood_size(cfg.resolve(layout.spatial)) + n * s + s * (n + s)
    return 4.0 * layout.batch * layout.heads * layout.head_dim * scores


# ----------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------


def time_call(fn, *args, warmup: int, iters: int) -> dict:
    """Compile time, then median/min wall time of `iters` blocking calls (milliseconds)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times),
            "first_call_s": compile_s}


def amdahl(share: float, speedup: float) -> float:
    """End-to-end speedup if a `share` of the time gets `speedup`x faster."""
    return 1.0 / ((1.0 - share) + share / speedup)


def make_inputs(layout: Layout, dtype, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)
    b, c = layout.batch, layout.dim
    vid = jax.random.normal(keys[0], (b, *layout.spatial, c), dtype)
    txt = jax.random.normal(keys[1], (b, layout.text, c), dtype)
    vec = jax.random.normal(keys[2], (b, c), dtype)
    return vid, txt, vec


def attention_inputs(layout: Layout, dtype, seed: int = 1):
    """Random q, k, v for video and text at the block's shapes (QK-normalised scale)."""
    keys = jax.random.split(jax.random.key(seed), 6)
    h, d, b = layout.heads, layout.head_dim, layout.batch
    shapes = [(b, *layout.spatial, h, d)] * 3 + [(b, layout.text, h, d)] * 3
    return [jax.random.normal(k, s, dtype) for k, s in zip(keys, shapes)]


def run(layout: Layout, args) -> dict:
    gpu = jax.default_backend() == "gpu"
    dtype = jnp.dtype(args.dtype or ("bfloat16" if gpu else "float32"))
    dense_impl = args.dense_implementation or ("cudnn" if gpu else "xla")
    model = DiTStack(layout, dtype, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    rope = rope_tables(layout.spatial, layout.head_dim) if args.rope else None
    inputs = make_inputs(layout, dtype)
    attn_inputs = attention_inputs(layout, dtype)

    def stack_fn(attention):
        return jax.jit(lambda p, vid, txt, vec, rope:
                       nnx.merge(graphdef, p)(vid, txt, vec, rope, attention))

    timing = dict(warmup=args.warmup, iters=args.iters)
    variants = {"dense": (None, dense_attention(dense_impl))}
    for name, cfg in layout.configs().items():
        if name in args.configs:
            variants[name] = (cfg, gna_attention(cfg, args.implementation, dense_impl))

    results, outputs = {}, {}
    for name, (cfg, attention) in variants.items():
        print(f"[{layout.name}] {name}: compiling and timing ...", flush=True)
        stack = time_call(stack_fn(attention), params, *inputs, rope, **timing)
        attn = time_call(jax.jit(attention), *attn_inputs, **timing)
        entry = {
            "stack_ms": stack["median_ms"], "stack_min_ms": stack["min_ms"],
            "stack_first_call_s": stack["first_call_s"],
            "attention_ms": attn["median_ms"], "attention_min_ms": attn["min_ms"],
            "attention_share": layout.blocks * attn["median_ms"] / stack["median_ms"],
            "attention_tflops": attention_flops(layout, cfg) / attn["median_ms"] / 1e9,
        }
        if cfg is not None:
            entry.update(window=list(layout.window), stride=list(
                cfg.stride if isinstance(cfg.stride, tuple) else [cfg.stride] * len(
                    layout.spatial)))
            sim = jax_gna.simulate(layout.spatial, cfg, head_dim=layout.head_dim)
            entry["video_flop_speedup"] = sim.flop_speedup
            entry["video_tile_speedup_sim"] = sim.tile_speedup
        results[name] = entry

    dense = results["dense"]
    # Attention timed alone can exceed its share inside the fused step; cap for the bounds.
    share = min(dense["attention_share"], 0.999)
    for name, entry in results.items():
        if name == "dense":
            continue
        cfg = variants[name][0]
        flop_speedup = attention_flops(layout, None) / attention_flops(layout, cfg)
        measured = dense["attention_ms"] / entry["attention_ms"]
        e2e = dense["stack_ms"] / entry["stack_ms"]
        entry.update(
            attention_flop_speedup=flop_speedup,
            attention_speedup=measured,
            e2e_speedup=e2e,
            amdahl_bound_flop=amdahl(share, flop_speedup),
            amdahl_bound_measured=amdahl(share, measured),
            fraction_of_flop_bound=e2e / amdahl(share, flop_speedup),
            fraction_of_measured_bound=e2e / amdahl(share, measured),
        )

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
        "jax": jax.__version__, "jax_gna_implementation": args.implementation or
        jax_gna.available_implementations()[0],
        "dense_implementation": dense_impl, "dtype": dtype.name,
        "layout": {**dataclasses.asdict(layout), "rope": bool(args.rope)},
        "timing": {"warmup": args.warmup, "iters": args.iters, "statistic": "median"},
        "amdahl_limit": 1.0 / max(1e-9, 1.0 - share),
        "results": results,
    }
    if args.verify:
        report["verify_max_abs_diff"] = verify(layout, graphdef, params, inputs, rope,
                                               args.implementation, dense_impl)
    return report


def verify(layout, graphdef, params, inputs, rope, implementation, dense_impl) -> float:
    """GNA with whole-axis windows is dense attention: the two stacks must agree."""
    whole = jax_gna.GNAConfig(-1)
    run_stack = lambda att: jax.jit(  # noqa: E731
        lambda p, *a: nnx.merge(graphdef, p)(*a, rope, att))(params, *inputs)
    got = run_stack(gna_attention(whole, implementation, dense_impl))
    want = run_stack(dense_attention(dense_impl))
    return max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))))
               for g, w in zip(got, want))


def print_report(report: dict) -> None:
    lay = report["layout"]
    print(f"\n{lay['name']}: {'x'.join(map(str, lay['spatial']))} tokens + {lay['text']} "
          f"text, {lay['heads']} heads x {lay['head_dim']}, {lay['blocks']} blocks, "
          f"{report['dtype']} on {report['device']} (GNA: {report['jax_gna_implementation']},"
          f" dense: {report['dense_implementation']})")
    print(f"{'variant':8s} {'step ms':>10s} {'attn ms':>10s} {'attn share':>10s} "
          f"{'attn TF/s':>10s} {'attn x':>8s} {'e2e x':>7s} {'bound(flop)':>11s} "
          f"{'bound(meas)':>11s}")
    for name, r in report["results"].items():
        extra = ("" if name == "dense" else
                 f" {r['attention_speedup']:8.2f} {r['e2e_speedup']:7.2f} "
                 f"{r['amdahl_bound_flop']:11.2f} {r['amdahl_bound_measured']:11.2f}")
        print(f"{name:8s} {r['stack_ms']:10.2f} {r['attention_ms']:10.2f} "
              f"{r['attention_share']:10.3f} {r['attention_tflops']:10.2f}{extra}")
    print(f"Amdahl limit (attention free): {report['amdahl_limit']:.2f}x")
    if "verify_max_abs_diff" in report:
        print(f"verify: whole-axis GNA stack vs dense stack, max |diff| = "
              f"{report['verify_max_abs_diff']:.2e}")


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.lower().split("x"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="video")
    p.add_argument("--small", action="store_true", help="CPU-sized layout")
    p.add_argument("--spatial", type=_shape, help="token layout, e.g. 30x48x80")
    p.add_argument("--text", type=int, help="number of text tokens")
    p.add_argument("--heads", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--blocks", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--window", type=_shape, help="GNA window, e.g. 18x24x24")
    p.add_argument("--stride", type=_shape, help="GNA stride of the 'gna' config")
    p.add_argument("--configs", default="gna,na", help="GNA variants to run: gna, na")
    p.add_argument("--implementation", default=None, help="jax_gna implementation")
    p.add_argument("--dense-implementation", default=None, help="cudnn or xla")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, else float32")
    p.add_argument("--rope", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                   help="check whole-axis GNA == dense (default: on with --small)")
    p.add_argument("--out", help="write the report as JSON here")
    args = p.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if args.verify is None:
        args.verify = args.small
    return args


def layout_from_args(args) -> Layout:
    layout = (SMALL if args.small else LAYOUTS)[args.layout]
    overrides = {k: getattr(args, a) for k, a in (
        ("spatial", "spatial"), ("text", "text"), ("heads", "heads"),
        ("head_dim", "head_dim"), ("blocks", "blocks"), ("batch", "batch"),
        ("window", "window"), ("stride", "stride")) if getattr(args, a) is not None}
    return dataclasses.replace(layout, **overrides)


def main(argv=None) -> int:
    args = parse_args(argv)
    layout = layout_from_args(args)
    for cfg in layout.configs().values():
        cfg.resolve(layout.spatial)  # fail fast on a bad window/stride
    report = run(layout, args)
    print_report(report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
