"""Flax layers for GNA.

* `NeighborhoodAttention`: the Flax NNX layer (``jax_gna.flax.NeighborhoodAttention``).
* `gna_attention_fn`: an ``attention_fn`` for `flax.nnx.MultiHeadAttention` and Linen's
  ``MultiHeadDotProductAttention`` that runs GNA on a token layout.
* `jax_gna.flax.linen.NeighborhoodAttention`: the Linen twin.
"""

from jax_gna.flax._common import gna_attention_fn
from jax_gna.flax.nnx import NeighborhoodAttention
from jax_gna.flax import linen

__all__ = ["NeighborhoodAttention", "gna_attention_fn", "linen"]
