"""jax_gna: Generalized Neighborhood Attention for JAX.

Public API: `GNAConfig`, `attention`, `na1d`/`na2d`/`na3d`, `neighborhood_mask`,
`available_implementations`, `merge_attentions`.
"""

from jax_gna.config import GNAConfig
from jax_gna.geometry import neighborhood_mask
from jax_gna.api import attention, available_implementations, na1d, na2d, na3d
from jax_gna.simulator import SimResult, find_configs, simulate
from jax_gna.merge import merge_attentions
from jax_gna.context_parallel import sharded_attention
from jax_gna import _implementations  # noqa: F401  (registers the implementations)

__all__ = [
    "GNAConfig",
    "SimResult",
    "attention",
    "available_implementations",
    "find_configs",
    "merge_attentions",
    "sharded_attention",
    "na1d",
    "na2d",
    "na3d",
    "neighborhood_mask",
    "simulate",
]
__version__ = "0.1.0"
