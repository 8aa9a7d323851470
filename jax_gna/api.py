"""Public entry points: `attention`, the NATTEN-style `na1d/na2d/na3d`, and dispatch.

This layer validates inputs (before anything is traced into a kernel), resolves the config,
picks an implementation and merges additional keys. Implementations live in their own
modules and all share one signature::

    impl(q, k, v, axes, scale, *, q_tile_shape, kv_tile_shape, deterministic) -> (out, lse)

with ``q: [B, *spatial, H, D]``, ``k, v: [B, *spatial, H_kv, D]`` already validated.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from jax_gna import geometry, merge
from jax_gna.config import AxisParams, GNAConfig


@dataclasses.dataclass(frozen=True)
class Implementation:
    """A registered implementation.

    Attributes:
      name: the ``implementation=`` value.
      fn: the implementation (signature in the module docstring).
      unavailable: returns None if the implementation can run here, else the reason.
      priority: `implementation=None` picks the available one with the highest priority.
      dtypes: input dtypes it accepts (names, e.g. "bfloat16").
    """

    name: str
    fn: Callable
    unavailable: Callable[[], str | None]
    priority: int
    dtypes: tuple[str, ...] = ("bfloat16", "float16", "float32", "float64")


_REGISTRY: dict[str, Implementation] = {}


def register(impl: Implementation) -> None:
    """Adds (or replaces) an implementation."""
    _REGISTRY[impl.name] = impl


def available_implementations() -> tuple[str, ...]:
    """Names of the implementations that can run on this machine, best first."""
    ready = [i for i in _REGISTRY.values() if i.unavailable() is None]
    return tuple(i.name for i in sorted(ready, key=lambda i: -i.priority))


def implementation_dtypes(name: str) -> tuple[str, ...]:
    """Input dtype names that implementation `name` accepts (ValueError if unknown)."""
    if name not in _REGISTRY:
        raise ValueError(f"implementation={name!r} is unknown; choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[name].dtypes


def _pick(implementation: str | None, dtype) -> Implementation:
    if implementation is None:
        for name in available_implementations():
            impl = _REGISTRY[name]
            if jnp.dtype(dtype).name in impl.dtypes and name != "reference":
                return impl
        raise ValueError(f"no available implementation accepts dtype {jnp.dtype(dtype).name}")
    if not isinstance(implementation, str) or implementation not in _REGISTRY:
        raise ValueError(f"implementation={implementation!r} is unknown; choose one of "
                         f"{sorted(_REGISTRY)} or None")
    impl = _REGISTRY[implementation]
    reason = impl.unavailable()
    if reason is not None:
        raise ValueError(f"implementation={implementation!r} is not available here: {reason}."
                         f" Available: {available_implementations()}")
    if jnp.dtype(dtype).name not in impl.dtypes:
        raise TypeError(f"implementation={implementation!r} does not accept dtype "
                        f"{jnp.dtype(dtype).name}; it takes {impl.dtypes}")
    return impl


def _check_inputs(q, k, v, cfg: GNAConfig) -> tuple[AxisParams, ...]:
    if not isinstance(cfg, GNAConfig):
        raise TypeError(f"cfg must be a jax_gna.GNAConfig, got {type(cfg).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} has dtype {x.dtype}; GNA needs floating-point inputs")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.ndim < 4 or q.ndim > 6:
        raise ValueError(f"q must be [B, *spatial, H, D] with 1 to 3 spatial axes, got shape "
                         f"{q.shape}")
    for name, x in (("k", k), ("v", v)):
        if x.ndim != q.ndim:
            raise ValueError(f"{name} has shape {x.shape} but q has shape {q.shape}: both must "
                             "be [B, *spatial, heads, head_dim]")
        if x.shape[:-2] != q.shape[:-2]:
            raise ValueError(f"{name}'s batch and spatial shape {x.shape[:-2]} must equal q's "
                             f"{q.shape[:-2]}")
        if x.shape[-1] != q.shape[-1]:
            raise ValueError(f"{name}'s head_dim {x.shape[-1]} must equal q's {q.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same number of heads, got {k.shape[-2]} and "
                         f"{v.shape[-2]}")
    h, h_kv = q.shape[-2], k.shape[-2]
    if h_kv < 1 or h % h_kv:
        raise ValueError(f"q's heads H={h} must be a multiple of k/v's heads H_kv={h_kv}")
    return cfg.resolve(q.shape[1:-2])


def _check_call(q, k, v, cfg: GNAConfig, scale, q_tile_shape, kv_tile_shape):
    """Validates a call's arrays, config, scale and tile overrides (shared by the entry
    points); returns ``(axes, scale, q_tile, kv_tile)`` with the default scale filled in."""
    axes = _check_inputs(q, k, v, cfg)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    rank = len(axes)
    q_tile = geometry.check_tile_shape("q_tile_shape", q_tile_shape, rank)
    kv_tile = geometry.check_tile_shape("kv_tile_shape", kv_tile_shape, rank)
    return axes, float(scale), q_tile, kv_tile


def attention(q: jax.Array, k: jax.Array, v: jax.Array, cfg: GNAConfig, *,
              scale: float | None = None, implementation: str | None = None,
              return_lse: bool = False,
              additional_keys: jax.Array | None = None,
              additional_values: jax.Array | None = None,
              q_tile_shape: Sequence[int] | None = None,
              kv_tile_shape: Sequence[int] | None = None,
              deterministic: bool = False):
    """Generalized neighborhood attention.

    Args:
      q: ``[B, *spatial, H, D]`` queries, 1 to 3 spatial axes, floating dtype.
      k, v: ``[B, *spatial, H_kv, D]`` keys and values, same dtype; ``H % H_kv == 0``
        (query head ``h`` uses kv head ``h // (H // H_kv)``).
      cfg: the `GNAConfig` (window, stride, dilation, causal per axis).
      scale: multiplies ``q·k``; defaults to ``D ** -0.5``.
      implementation: ``"reference"``, ``"xla"``, ``"cpu"``, ``"cuda"`` or None for the best
        available (`available_implementations()`).
      return_lse: also return the natural-log sum-exp of the scaled scores.
      additional_keys, additional_values: optional ``[B, S_extra, H_kv, D]`` tokens that
        every query attends to besides its neighbourhood (merged exactly through the LSEs).
      q_tile_shape, kv_tile_shape: expert override of the tile shapes (one int per axis), for
        the forward and the backward. By default each pass picks its own
        (`geometry.default_tile_shapes`, `geometry.backward_tile_shapes`).
      deterministic: request bitwise-reproducible gradients where the implementation has a
        choice. The ``cuda`` backward without it adds dq up in float32 in no fixed order
        (five GEMMs per query-key pair instead of seven, and a float32 scratch of q's
        size); with it, dq has its own kernel.

    Returns:
      ``out`` with q's shape and dtype, or ``(out, lse)`` with ``lse: [B, *spatial, H]``
      float32.

    Raises:
      ValueError, TypeError: invalid shapes, dtypes, config or implementation, before
        anything runs.
    """
    axes, scale, q_tile, kv_tile = _check_call(q, k, v, cfg, scale, q_tile_shape,
                                               kv_tile_shape)
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values must be given together")
    if additional_keys is not None:
        _check_additional(q, k, additional_keys, additional_values)
    impl = _pick(implementation, q.dtype)
    out, lse = impl.fn(q, k, v, axes, float(scale), q_tile_shape=q_tile,
                       kv_tile_shape=kv_tile, deterministic=bool(deterministic))
    if additional_keys is not None:
        out, lse = merge.attend_additional(q, out, lse, additional_keys, additional_values,
                                           float(scale))
    return (out, lse) if return_lse else out


def _check_additional(q, k, ak, av) -> None:
    for name, x in (("additional_keys", ak), ("additional_values", av)):
        if not hasattr(x, "shape") or x.ndim != 4:
            raise ValueError(f"{name} must be [B, S_extra, H_kv, D], got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype}; it must match q's {q.dtype}")
        if (x.shape[0], x.shape[2], x.shape[3]) != (q.shape[0], k.shape[-2], q.shape[-1]):
            raise ValueError(f"{name} has shape {x.shape}; expected [B={q.shape[0]}, S_extra, "
                             f"H_kv={k.shape[-2]}, D={q.shape[-1]}]")
    if ak.shape != av.shape:
        raise ValueError(f"additional_keys {ak.shape} and additional_values {av.shape} must "
                         "have the same shape")


def _na(rank: int):
    def na(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, *, scale=None,
           implementation=None, return_lse=False, **kwargs):
        if getattr(q, "ndim", None) != rank + 3:
            raise ValueError(f"na{rank}d expects q of rank {rank + 3} ([B, {rank} spatial "
                             f"axes, H, D]), got shape {getattr(q, 'shape', None)}")
        cfg = GNAConfig(kernel_size, stride, dilation, is_causal)
        if cfg.rank not in (None, rank):
            raise ValueError(f"na{rank}d got per-axis parameters for {cfg.rank} axes")
        return attention(q, k, v, cfg, scale=scale, implementation=implementation,
                         return_lse=return_lse, **kwargs)

    na.__name__ = na.__qualname__ = f"na{rank}d"
    na.__doc__ = (f"NATTEN-style {rank}-D neighborhood attention: `attention` with "
                  f"``GNAConfig(kernel_size, stride, dilation, is_causal)``; q must have "
                  f"{rank} spatial axes.")
    return na


na1d = _na(1)
na2d = _na(2)
na3d = _na(3)
