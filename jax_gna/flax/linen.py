"""Flax Linen twin of `jax_gna.flax.NeighborhoodAttention`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jax_gna.api import attention
from jax_gna.config import GNAConfig, BoolOrTuple, IntOrTuple
from jax_gna.flax import _common
from jax_gna.flax._common import gna_attention_fn

__all__ = ["NeighborhoodAttention", "gna_attention_fn"]


class NeighborhoodAttention(nn.Module):
    """Multi-head generalized neighborhood attention (Linen).

    Same computation and parameter tree as the NNX layer: ``qkv/{kernel, bias}`` and
    ``proj/{kernel, bias}``; input features are inferred from the input (`in_features`, if
    given, is checked against it).

    Attributes:
      num_heads, kernel_size, stride, dilation, is_causal, num_kv_heads, qkv_bias,
      out_features, dtype, param_dtype, kernel_init, bias_init, implementation: as in
        `jax_gna.flax.NeighborhoodAttention`.
      in_features: optional expected input channels.
    """

    num_heads: int
    kernel_size: IntOrTuple
    stride: IntOrTuple = 1
    dilation: IntOrTuple = 1
    is_causal: BoolOrTuple = False
    num_kv_heads: int | None = None
    qkv_bias: bool = True
    out_features: int | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()
    implementation: str | None = None
    in_features: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """``x [B, *spatial, C]`` (and optional ``context [B, S, C]``) -> ``[B, *spatial,
        out_features or C]``; see the NNX layer."""
        channels = x.shape[-1]
        if self.in_features is not None and self.in_features != channels:
            raise ValueError(f"x has {channels} features; the layer expects "
                             f"in_features={self.in_features}")
        kv_heads, head_dim = _common.check_heads(channels, self.num_heads, self.num_kv_heads)
        _common.check_layer_input(x, channels, context)
        cfg = GNAConfig(self.kernel_size, self.stride, self.dilation, self.is_causal)
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=self.kernel_init, bias_init=self.bias_init)
        qkv = nn.Dense((self.num_heads + 2 * kv_heads) * head_dim, use_bias=self.qkv_bias,
                       name="qkv", **dense)
        q, k, v = _common.split_qkv(qkv(x), self.num_heads, kv_heads, head_dim)
        ctx_k = ctx_v = None
        if context is not None:
            _, ctx_k, ctx_v = _common.split_qkv(qkv(context), self.num_heads, kv_heads,
                                                head_dim)
        out = attention(q, k, v, cfg, implementation=self.implementation,
                        additional_keys=ctx_k, additional_values=ctx_v)
        out = out.reshape(*x.shape[:-1], self.num_heads * head_dim)
        return nn.Dense(self.out_features or channels, name="proj", **dense)(out)
