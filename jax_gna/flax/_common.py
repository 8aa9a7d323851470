"""Pieces shared by the NNX and Linen layers: argument checks, the QKV split, and the
``attention_fn`` adapter for Flax's multi-head attention modules."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

import jax_gna
from jax_gna.config import GNAConfig


def check_heads(in_features: int, num_heads: int, num_kv_heads: int | None) -> tuple[int, int]:
    """Validates the head layout; returns ``(num_kv_heads, head_dim)``.

    Raises:
      ValueError: non-positive counts, ``in_features % num_heads != 0`` or
        ``num_heads % num_kv_heads != 0``.
    """
    for name, value in (("in_features", in_features), ("num_heads", num_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")
    if in_features % num_heads:
        raise ValueError(f"in_features={in_features} must be divisible by "
                         f"num_heads={num_heads} (head_dim = in_features // num_heads)")
    kv = num_heads if num_kv_heads is None else num_kv_heads
    if isinstance(kv, bool) or not isinstance(kv, int) or kv < 1 or num_heads % kv:
        raise ValueError(f"num_kv_heads={num_kv_heads!r} must be a positive divisor of "
                         f"num_heads={num_heads}")
    return kv, in_features // num_heads


def split_qkv(qkv: jax.Array, num_heads: int, num_kv_heads: int, head_dim: int):
    """``[..., (H + 2·H_kv)·D]`` -> ``q [..., H, D]``, ``k, v [..., H_kv, D]``."""
    lead = qkv.shape[:-1]
    q_end = num_heads * head_dim
    k_end = q_end + num_kv_heads * head_dim
    q = qkv[..., :q_end].reshape(*lead, num_heads, head_dim)
    k = qkv[..., q_end:k_end].reshape(*lead, num_kv_heads, head_dim)
    v = qkv[..., k_end:].reshape(*lead, num_kv_heads, head_dim)
    return q, k, v


def check_layer_input(x: jax.Array, in_features: int, context: jax.Array | None) -> None:
    """``x [B, *spatial, C]`` with 1-3 spatial axes; ``context [B, S, C]`` or None."""
    if x.ndim < 3 or x.ndim > 5:
        raise ValueError(f"x must be [B, *spatial, C] with 1 to 3 spatial axes, got shape "
                         f"{x.shape}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features; the layer expects "
                         f"in_features={in_features}")
    if context is not None:
        if context.ndim != 3 or context.shape[0] != x.shape[0] or \
                context.shape[-1] != in_features:
            raise ValueError(f"context must be [B={x.shape[0]}, S, C={in_features}], got "
                             f"shape {context.shape}")


# ----------------------------------------------------------------------------------------
# attention_fn adapter
# ----------------------------------------------------------------------------------------

def _default_precision(precision) -> bool:
    return precision is None or precision in (jax.lax.Precision.DEFAULT, "default") or (
        isinstance(precision, (tuple, list))
        and all(p is None or p == jax.lax.Precision.DEFAULT for p in precision))


def gna_attention_fn(spatial_shape: Sequence[int], cfg: GNAConfig,
                     implementation: str | None = None, *,
                     scale: float | None = None) -> Callable[..., jax.Array]:
    """An ``attention_fn`` for `flax.nnx.MultiHeadAttention` (and Linen's
    ``MultiHeadDotProductAttention``) that runs GNA on a token layout.

    The returned function takes ``query [batch..., N, H, D]`` and ``key, value
    [batch..., N, H_kv, D]`` where ``N = prod(spatial_shape)`` tokens are in row-major order
    (or ``[batch..., *spatial_shape, heads, D]``), and returns attention output shaped like
    ``query``. It accepts every keyword Flax passes; what GNA cannot honour raises a
    ValueError when the module is called: a ``mask`` or ``bias`` (the neighbourhood is the
    mask), dropout on attention weights (``dropout_rate > 0`` and not ``deterministic``),
    ``module`` (``sow_weights=True``: GNA never forms attention weights), a non-default
    ``precision``, custom einsum modules, and ``is_causal=True`` unless `cfg` is causal on
    every axis (causality is a per-axis property of `cfg`).

    Args:
      spatial_shape: the token layout, 1 to 3 axes.
      cfg: the GNA configuration (validated against `spatial_shape` here).
      implementation: passed to `jax_gna.attention`.
      scale: score scale; defaults to ``D ** -0.5`` like Flax's dot-product attention.

    Raises:
      ValueError, TypeError: `cfg` or `spatial_shape` invalid.
    """
    if not isinstance(cfg, GNAConfig):
        raise TypeError(f"cfg must be a jax_gna.GNAConfig, got {type(cfg).__name__}")
    spatial = tuple(int(s) for s in spatial_shape)
    axes = cfg.resolve(spatial)
    all_causal = all(a.causal for a in axes)
    n_tokens = math.prod(spatial)

    def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                     dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                     precision=None, module=None, promote_dtype=None, is_causal=False,
                     force_fp32_for_softmax=False, qk_attn_weights_einsum=None,
                     attn_weights_value_einsum=None):
        del broadcast_dropout, dropout_rng, force_fp32_for_softmax  # softmax is fp32 always
        _reject_unsupported(bias, mask, dropout_rate, deterministic, precision, module,
                            is_causal, all_causal, qk_attn_weights_einsum,
                            attn_weights_value_einsum)
        if promote_dtype is not None:
            query, key, value = promote_dtype((query, key, value), dtype=dtype)
        else:
            common = dtype if dtype is not None else jnp.result_type(query, key, value)
            query, key, value = (x.astype(common) for x in (query, key, value))
        batch = _batch_shape("query", query, spatial, n_tokens)
        for name, x in (("key", key), ("value", value)):
            if _batch_shape(name, x, spatial, n_tokens) != batch:
                raise ValueError(f"{name} has shape {x.shape}; GNA is self-attention over "
                                 f"one layout, so its batch and token axes must match "
                                 f"query's {query.shape}")
        b = math.prod(batch)
        q, k, v = (x.reshape(b, *spatial, *x.shape[-2:]) for x in (query, key, value))
        out = jax_gna.attention(q, k, v, cfg, scale=scale, implementation=implementation)
        return out.reshape(query.shape)

    return attention_fn


def _reject_unsupported(bias, mask, dropout_rate, deterministic, precision, module,
                        is_causal, all_causal, qk_einsum, av_einsum) -> None:
    if bias is not None:
        raise ValueError("bias is not supported by the GNA attention_fn: attention weights "
                         "are never formed, so no additive bias can be applied")
    if mask is not None:
        raise ValueError("mask is not supported by the GNA attention_fn: the neighbourhood "
                         "(GNAConfig) is the mask; pass mask=None (and decode=False)")
    if dropout_rate and not deterministic:
        raise ValueError(f"dropout_rate={dropout_rate} with deterministic=False is not "
                         "supported: GNA has no attention-weight dropout; set "
                         "dropout_rate=0 or call with deterministic=True")
    if module is not None:
        raise ValueError("module (sow_weights=True) is not supported: GNA never forms the "
                         "attention weights, so they cannot be sown")
    if not _default_precision(precision):
        raise ValueError(f"precision={precision!r} is not supported: GNA implementations "
                         "choose their own matmul precision (float32 accumulation); leave "
                         "precision=None")
    if qk_einsum is not None or av_einsum is not None:
        raise ValueError("qk_attn_weights_einsum / attn_weights_value_einsum are not "
                         "supported: GNA does not run attention as two einsums")
    if is_causal and not all_causal:
        raise ValueError("is_causal=True needs a GNAConfig that is causal on every axis; "
                         "causality is set per axis with GNAConfig(is_causal=...)")


def _batch_shape(name: str, x, spatial: tuple[int, ...], n_tokens: int) -> tuple[int, ...]:
    """Batch dims of ``[batch..., N, h, D]`` or ``[batch..., *spatial, h, D]``."""
    shape = getattr(x, "shape", None)
    if shape is None:
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    rank = len(spatial)
    if len(shape) >= 3 and shape[-3] == n_tokens:
        return tuple(shape[:-3])
    if len(shape) >= rank + 2 and tuple(shape[-2 - rank:-2]) == spatial:
        return tuple(shape[:-2 - rank])
    raise ValueError(f"{name} of shape {shape} has neither N={n_tokens} tokens nor the "
                     f"spatial layout {spatial} before its [heads, head_dim] axes")
