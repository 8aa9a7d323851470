"""Flax NNX neighborhood-attention layer."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jax_gna.api import attention
from jax_gna.config import GNAConfig, BoolOrTuple, IntOrTuple
from jax_gna.flax import _common

Initializer = Any


class NeighborhoodAttention(nnx.Module):
    """Multi-head generalized neighborhood attention over 1-3 spatial axes.

    A fused QKV projection (``in_features -> (H + 2·H_kv)·head_dim``, ``head_dim =
    in_features // num_heads``), `jax_gna.attention` with
    ``GNAConfig(kernel_size, stride, dilation, is_causal)``, and an output projection
    (``H·head_dim -> out_features``). Parameters: ``qkv.kernel [C, (H+2H_kv)·D]``,
    ``qkv.bias`` (if `qkv_bias`), ``proj.kernel [H·D, out]``, ``proj.bias``.

    Args:
      in_features: channels ``C`` of the input.
      num_heads: query heads ``H`` (must divide `in_features`).
      kernel_size, stride, dilation, is_causal: the GNA window, per axis or broadcast.
      num_kv_heads: key/value heads (GQA); defaults to `num_heads`; must divide it.
      qkv_bias: whether the QKV projection has a bias.
      out_features: output channels; defaults to `in_features`.
      dtype: computation dtype (default: inferred from inputs and parameters).
      param_dtype: parameter dtype.
      kernel_init, bias_init: initializers of both projections.
      implementation: `jax_gna.attention`'s implementation (None: best available).
      rngs: `nnx.Rngs` for the parameters.

    Raises:
      ValueError, TypeError: invalid head layout or GNA parameters.
    """

    def __init__(self, in_features: int, num_heads: int, kernel_size: IntOrTuple,
                 stride: IntOrTuple = 1, dilation: IntOrTuple = 1,
                 is_causal: BoolOrTuple = False, *, num_kv_heads: int | None = None,
                 qkv_bias: bool = True, out_features: int | None = None,
                 dtype: Any = None, param_dtype: Any = jnp.float32,
                 kernel_init: Initializer = nnx.initializers.lecun_normal(),
                 bias_init: Initializer = nnx.initializers.zeros_init(),
                 implementation: str | None = None, rngs: nnx.Rngs):
        self.num_kv_heads, self.head_dim = _common.check_heads(in_features, num_heads,
                                                               num_kv_heads)
        self.in_features = in_features
        self.num_heads = num_heads
        self.out_features = in_features if out_features is None else out_features
        self.cfg = GNAConfig(kernel_size, stride, dilation, is_causal)
        self.implementation = implementation
        linear = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
                      bias_init=bias_init, rngs=rngs)
        qkv_out = (num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv = nnx.Linear(in_features, qkv_out, use_bias=qkv_bias, **linear)
        self.proj = nnx.Linear(num_heads * self.head_dim, self.out_features, **linear)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """Applies the layer.

        Args:
          x: ``[B, *spatial, in_features]``, 1 to 3 spatial axes.
          context: optional ``[B, S, in_features]`` extra tokens (e.g. text) whose keys and
            values (same QKV projection) every query attends to besides its neighbourhood.

        Returns:
          ``[B, *spatial, out_features]``.
        """
        _common.check_layer_input(x, self.in_features, context)
        q, k, v = _common.split_qkv(self.qkv(x), self.num_heads, self.num_kv_heads,
                                    self.head_dim)
        ctx_k = ctx_v = None
        if context is not None:
            _, ctx_k, ctx_v = _common.split_qkv(self.qkv(context), self.num_heads,
                                                self.num_kv_heads, self.head_dim)
        out = attention(q, k, v, self.cfg, implementation=self.implementation,
                        additional_keys=ctx_k, additional_values=ctx_v)
        return self.proj(out.reshape(*x.shape[:-1], self.num_heads * self.head_dim))
