"""Exact merging of attentions over disjoint key sets, and additional (e.g. text) tokens.

Attention over a union of disjoint key sets equals a convex combination of the attentions over
each set, weighted by their softmax normalisers::

    lse = log(sum_i exp(lse_i)),    out = sum_i exp(lse_i - lse) * out_i

`merge_attentions` implements that (differentiable through both outputs and LSEs), and
`attend_additional` uses it to add dense attention against a few extra tokens to a GNA result,
so that every query sees its neighbourhood plus all extra tokens (joint text-video attention).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp


def _acc_dtype(dtype) -> jnp.dtype:
    """Accumulation dtype: at least float32 (float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def merge_attentions(outputs: Sequence[jax.Array],
                     lses: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Merges attentions of the same queries over disjoint key sets.

    Args:
      outputs: one or more arrays ``[..., H, D]`` of the same shape (any floating dtypes),
        each the attention output over one key set.
      lses: matching arrays ``[..., H]``: the natural-log sum-exp of each part's scaled
        scores; ``-inf`` marks a part with no key for that query (its output is ignored).

    Returns:
      ``(out, lse)``: ``out [..., H, D]`` in ``outputs[0]``'s dtype (zero where every part
      is empty) and ``lse [..., H]`` float32 (``-inf`` where every part is empty). The math
      runs in at least float32; gradients flow through outputs and LSEs and are finite for
      every input, including all-``-inf`` rows.

    Raises:
      ValueError: empty or mismatched sequences, or shapes that do not agree.
      TypeError: non-floating inputs.
    """
    outputs, lses = list(outputs), list(lses)
    _check_merge_inputs(outputs, lses)
    acc = _acc_dtype(jnp.result_type(*outputs, *lses))
    stacked_lse = jnp.stack([x.astype(acc) for x in lses])              # [P, ..., H]
    # The merge is invariant to the shift; a constant (non-differentiated) shift keeps the
    # exponentials in range, and 0 replaces -inf so that an all-empty row stays NaN-free.
    top = jax.lax.stop_gradient(jnp.max(stacked_lse, axis=0))
    shift = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp(stacked_lse - shift)                              # 0 for empty parts
    total = jnp.sum(weights, axis=0)
    nonempty = total > 0
    safe_total = jnp.where(nonempty, total, 1.0)
    lse = jnp.where(nonempty, shift + jnp.log(safe_total), -jnp.inf)
    out = sum(o.astype(acc) * (w / safe_total)[..., None]
              for o, w in zip(outputs, weights))
    return out.astype(outputs[0].dtype), lse.astype(jnp.float32)


def _check_merge_inputs(outputs: list, lses: list) -> None:
    if not outputs:
        raise ValueError("outputs must hold at least one attention output")
    if len(outputs) != len(lses):
        raise ValueError(f"outputs and lses must have the same length, got {len(outputs)} "
                         f"and {len(lses)}")
    for name, seq in (("outputs", outputs), ("lses", lses)):
        for i, x in enumerate(seq):
            if not hasattr(x, "shape") or not hasattr(x, "dtype"):
                raise TypeError(f"{name}[{i}] must be an array, got {type(x).__name__}")
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise TypeError(f"{name}[{i}] has dtype {x.dtype}; it must be floating")
    shape = outputs[0].shape
    if len(shape) < 2:
        raise ValueError(f"outputs[0] must be [..., H, D], got shape {shape}")
    for i, (o, l) in enumerate(zip(outputs, lses)):
        if o.shape != shape:
            raise ValueError(f"outputs[{i}] has shape {o.shape}; every output must have "
                             f"outputs[0]'s shape {shape}")
        if l.shape != shape[:-1]:
            raise ValueError(f"lses[{i}] has shape {l.shape}; it must be the output shape "
                             f"without its last axis, {shape[:-1]}")


# ----------------------------------------------------------------------------------------
# Dense attention against a few extra tokens, with its LSE.
# ----------------------------------------------------------------------------------------

def _einsum(spec, a, b, **kwargs):
    # Full float32 products: GPUs default to TF32 for f32 matmuls, which would cost the
    # extra-token attention three decimal digits (the N x S_extra products are cheap).
    return jnp.einsum(spec, a, b, precision=jax.lax.Precision.HIGHEST, **kwargs)


def _scores(q, k, scale):
    """``q [B,N,Hkv,G,D]``, ``k [B,S,Hkv,D]`` -> float scores ``[B,Hkv,G,N,S]``."""
    acc = _acc_dtype(q.dtype)
    s = _einsum("bnkgd,bskd->bkgns", q, k, preferred_element_type=acc)
    return s.astype(acc) * jnp.asarray(scale, acc)


def _dense_einsum(q, k, v, scale):
    """Forward in jnp. ``q [B,N,H,D]``, ``k, v [B,S,Hkv,D]`` -> ``(out, lse [B,N,H] f32)``."""
    b, n, h, d = q.shape
    h_kv = k.shape[2]
    qg = q.reshape(b, n, h_kv, h // h_kv, d)
    s = _scores(qg, k, scale)
    lse = jax.nn.logsumexp(s, axis=-1)                                  # [B,Hkv,G,N]
    p = jnp.exp(s - lse[..., None])
    out = _einsum("bkgns,bskd->bnkgd", p, v.astype(p.dtype))
    lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, n, h)
    return out.reshape(q.shape).astype(q.dtype), lse.astype(jnp.float32)


def _cudnn_usable(q, k) -> bool:
    """Whether cuDNN's fused attention may run this problem (checked before tracing it)."""
    if jax.default_backend() != "gpu":
        return False
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    d = q.shape[-1]
    return d % 8 == 0 and d <= 128


def _dense_cudnn(q, k, v, scale):
    """cuDNN flash attention forward with its float32 softmax statistics as the LSE.

    The public `jax.nn.dot_product_attention(return_residual=True)` rounds the LSE to the
    output dtype (a bf16 LSE would put percent-level errors into the merge weights), so this
    calls the cuDNN wrapper underneath it, which returns the float32 statistics ``[B,H,N]``.
    """
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa  # private; see caller
    out, stats = cudnn_fa.dot_product_attention(q, k, v, scale=scale, return_residual=True)
    return out, jnp.transpose(stats, (0, 2, 1)).astype(jnp.float32)


def _dense_forward(q, k, v, scale, backend):
    if backend == "cudnn":
        try:
            return _dense_cudnn(q, k, v, scale)
        except (ImportError, AttributeError, NotImplementedError, RuntimeError, TypeError,
                ValueError):
            # cuDNN rejected the shape/version at trace time, or the private wrapper moved
            # in this jax version: the jnp path computes the same thing.
            pass
    return _dense_einsum(q, k, v, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def dense_attention_with_lse(q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
                             backend: str = "xla") -> tuple[jax.Array, jax.Array]:
    """Dense attention of every query against a (small) set of tokens, with its LSE.

    Args:
      q: ``[B, N, H, D]`` queries.
      k, v: ``[B, S, H_kv, D]`` keys and values, ``H % H_kv == 0`` (GQA), q's dtype.
      scale: multiplies ``q·k``.
      backend: ``"cudnn"`` (fused cuDNN forward where it accepts the problem, else jnp) or
        ``"xla"`` (jnp). The backward is jnp either way.

    Returns:
      ``(out [B, N, H, D] in q's dtype, lse [B, N, H] float32)``.

    Memory is ``O(B·H·N·S)`` in float32 for the jnp paths and the backward: linear in the
    number of queries, meant for a few hundred extra tokens.
    """
    return _dense_forward(q, k, v, scale, backend)


def _dense_fwd(q, k, v, scale, backend):
    out, lse = _dense_forward(q, k, v, scale, backend)
    return (out, lse), (q, k, v, lse)


def _dense_bwd(scale, backend, residuals, cotangents):
    """Gradients for cotangents on both the output and the LSE.

    With ``P = exp(S - lse)``: ``dS = P * (dO·Vᵀ - rowsum(P * dO·Vᵀ) + dlse)``; the
    ``dlse`` term is what makes merged attentions differentiate exactly.
    """
    del backend
    q, k, v, lse = residuals
    d_out, d_lse = cotangents
    b, n, h, d = q.shape
    h_kv = k.shape[2]
    g = h // h_kv
    acc = _acc_dtype(q.dtype)
    qg = q.reshape(b, n, h_kv, g, d)
    lse_g = jnp.transpose(lse.reshape(b, n, h_kv, g), (0, 2, 3, 1)).astype(acc)
    p = jnp.exp(_scores(qg, k, scale) - lse_g[..., None])               # [B,Hkv,G,N,S]
    do = d_out.reshape(b, n, h_kv, g, d).astype(acc)
    dp = _einsum("bnkgd,bskd->bkgns", do, v.astype(acc))
    delta = jnp.sum(p * dp, axis=-1, keepdims=True)
    dl = jnp.transpose(d_lse.reshape(b, n, h_kv, g), (0, 2, 3, 1)).astype(acc)[..., None]
    ds = p * (dp - delta + dl) * jnp.asarray(scale, acc)
    dq = _einsum("bkgns,bskd->bnkgd", ds, k.astype(acc)).reshape(q.shape)
    dk = _einsum("bkgns,bnkgd->bskd", ds, qg.astype(acc))
    dv = _einsum("bkgns,bnkgd->bskd", p, do)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


dense_attention_with_lse.defvjp(_dense_fwd, _dense_bwd)


def attend_additional(q: jax.Array, out: jax.Array, lse: jax.Array,
                      additional_keys: jax.Array, additional_values: jax.Array,
                      scale: float, *, backend: str | None = None
                      ) -> tuple[jax.Array, jax.Array]:
    """Adds dense attention against extra tokens to a GNA result, exactly.

    Args:
      q: ``[B, *spatial, H, D]`` the GNA queries.
      out, lse: the GNA result for `q` (``out`` like q, ``lse [B, *spatial, H]``).
      additional_keys, additional_values: ``[B, S_extra, H_kv, D]`` (validated by
        `jax_gna.attention`), attended by every query.
      scale: the same score scale GNA used.
      backend: ``"cudnn"``, ``"xla"`` or None (cuDNN where it accepts the problem).

    Returns:
      ``(out, lse)`` of attention over neighbourhood ∪ extra tokens, shapes as the inputs'.
    """
    if backend is None:
        backend = "cudnn" if _cudnn_usable(q, additional_keys) else "xla"
    elif backend not in ("cudnn", "xla"):
        raise ValueError(f"backend={backend!r} must be 'cudnn', 'xla' or None")
    b, *spatial, h, d = q.shape
    n = 1
    for length in spatial:
        n *= length
    extra_out, extra_lse = dense_attention_with_lse(
        q.reshape(b, n, h, d), additional_keys, additional_values, float(scale), backend)
    merged, merged_lse = merge_attentions(
        [out, extra_out.reshape(q.shape)], [lse, extra_lse.reshape(lse.shape)])
    return merged, merged_lse
