"""Registers every implementation with the dispatcher (`api.register`).

Each implementation module exposes `attention(q, k, v, axes, scale, **options)`; this file
says when it can run and how it ranks for `implementation=None`.
"""

from jax_gna import api, reference

api.register(api.Implementation(
    name="reference", fn=reference.attention, unavailable=lambda: None, priority=0))

from jax_gna import xla  # noqa: E402  (kept next to its registration)

api.register(api.Implementation(
    name="xla", fn=xla.attention, unavailable=lambda: None, priority=10))

from jax_gna import native  # noqa: E402  (kept next to its registration)

api.register(api.Implementation(
    name="cpu", fn=native.cpu_attention, unavailable=native.cpu_unavailable, priority=5,
    dtypes=native.CPU_DTYPES))
api.register(api.Implementation(
    name="cuda", fn=native.cuda_attention, unavailable=native.cuda_unavailable, priority=20,
    dtypes=native.CUDA_DTYPES))
