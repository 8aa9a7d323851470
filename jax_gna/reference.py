"""The `reference` implementation: dense masked attention in plain jnp.

Quadratic in the number of tokens; for tests and small problems only. Its mask comes from
`geometry.axes_mask`, so it states the semantics, not a tiling of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_gna import geometry
from jax_gna.config import AxisParams

#: Largest ``B * H * N * N`` score count the reference accepts (1 GiB of float32 scores).
MAX_SCORES = 2**28


def attention(q: jax.Array, k: jax.Array, v: jax.Array, axes: tuple[AxisParams, ...],
              scale: float, *, frames: tuple[geometry.AxisFrame, ...] | None = None,
              **_options) -> tuple[jax.Array, jax.Array]:
    """Dense masked GNA. Shapes as in `jax_gna.attention`; returns ``(out, lse)``.

    With `frames`, q holds the frames' query slab and k/v their K/V slab of the global
    problem `axes` (`geometry.AxisFrame`).
    """
    b, *spatial, h, d = q.shape
    h_kv = k.shape[-2]
    n = int(np.prod(spatial))
    m = int(np.prod(k.shape[1:-2]))
    if b * h * n * m > MAX_SCORES:
        raise ValueError(
            f"implementation='reference' would build {b}*{h}*{n}*{m} scores, more than "
            f"MAX_SCORES={MAX_SCORES}; use implementation='xla', which never builds an "
            "N x N array")
    acc = jnp.promote_types(q.dtype, jnp.float32)
    qf = q.reshape(b, n, h_kv, h // h_kv, d).astype(acc)
    kf = k.reshape(b, m, h_kv, d).astype(acc)
    vf = v.reshape(b, m, h_kv, d).astype(acc)
    # HIGHEST: on GPUs the default f32 matmul drops to TF32 (~1e-3 error), too loose here.
    hi = jax.lax.Precision.HIGHEST
    s = jnp.einsum("bqkgd,bjkd->bkgqj", qf, kf, precision=hi) * jnp.asarray(scale, acc)
    s = jnp.where(jnp.asarray(geometry.axes_mask(axes, frames)), s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - lse[..., None])
    out = jnp.einsum("bkgqj,bjkd->bqkgd", p, vf, precision=hi)
    out = out.reshape(q.shape).astype(q.dtype)
    lse = jnp.moveaxis(lse.reshape(b, h, n), 1, -1).reshape(b, *spatial, h)
    return out, lse.astype(jnp.float32)
