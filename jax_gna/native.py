"""The native implementations ``"cpu"`` and ``"cuda"``: GNA as XLA FFI custom calls.

This module is the one place where Python meets the compiled extension `_jax_gna_native`:

* it registers the FFI handlers (CPU always, CUDA when the extension was built with it);
* `_call_forward` / `_call_backward` issue `jax.ffi.ffi_call` with the attribute set that
  ``cuda/gna_ffi.h`` decodes (int64 arrays, a float32 scale, a bool flag);
* each call is wrapped in `jax.experimental.custom_partitioning` (a Shardy sharding rule
  plus GSPMD callbacks) so that batch- and head-sharded inputs stay sharded, and in
  `jax.custom_batching.custom_vmap` so that ``vmap`` folds into the leading (batch)
  dimensions that the handlers flatten — no Python loop, no per-example call;
* `attention` is a `jax.custom_vjp` whose forward saves ``(q, k, v, out, lse)`` and whose
  backward is the backward custom call.

Sharding: leading (batch) axes and the head axis may be sharded; heads are split in whole
kv-head groups (query heads ``[i*H/n, (i+1)*H/n)`` with kv heads ``[i*H_kv/n, ...)``), so
the mesh axes on the head dimension must divide ``H_kv``, else heads are gathered. Spatial
and head_dim axes are gathered before the call (correct, but every device then holds the
whole spatial extent; halo exchange is future work).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from jax_gna import geometry
from jax_gna.config import AxisParams

# The extension is imported after jax and numpy (above) on purpose: built by a compiler that
# links libstdc++ statically, loading it before ml_dtypes makes ml_dtypes crash.
try:  # the compiled part; absent in a source checkout that was never built
    import _jax_gna_native as _ext
    _IMPORT_ERROR: str | None = None
except ImportError as err:  # pragma: no cover - depends on the build
    _ext = None
    _IMPORT_ERROR = f"the compiled extension _jax_gna_native did not import ({err})"

#: Input dtypes of each implementation.
CPU_DTYPES = ("bfloat16", "float16", "float32")
CUDA_DTYPES = ("bfloat16", "float16")

_XLA_PLATFORM = {"cpu": "cpu", "cuda": "CUDA"}


def _register_targets() -> None:
    """Registers every handler the extension carries with XLA (idempotent per process)."""
    for platform, xla_platform in _XLA_PLATFORM.items():
        for name, capsule in _ext.handlers(platform).items():
            jax.ffi.register_ffi_target(name, capsule, platform=xla_platform, api_version=1)


if _ext is not None:
    _register_targets()


# ----------------------------------------------------------------------------------------
# Availability.
# ----------------------------------------------------------------------------------------

def has_cuda() -> bool:
    """Whether the installed extension contains the CUDA handlers and kernels."""
    return _ext is not None and bool(_ext.has_cuda())


def extension_unavailable() -> str | None:
    """None if the compiled extension imported, else why not."""
    return _IMPORT_ERROR


def _default_platform() -> str:
    """Platform a jitted call runs on by default: `jax.default_device` if set, else the
    default backend."""
    device = jax.config.jax_default_device
    if device is None:
        return jax.default_backend()
    return device if isinstance(device, str) else device.platform


def cpu_unavailable() -> str | None:
    """None if ``implementation="cpu"`` can run on the default device, else why not."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    platform = _default_platform()
    if platform != "cpu":
        # Its handler is registered for XLA's CPU platform only; a GPU computation would
        # fail at compile time with an unhelpful "no FFI handler" error.
        return (f"it runs on JAX's CPU backend and the default device is on {platform!r}; "
                "use `with jax.default_device(jax.devices('cpu')[0]):` or JAX_PLATFORMS=cpu")
    return None


def cuda_unavailable() -> str | None:
    """None if ``implementation="cuda"`` can run on the default device, else why not."""
    if _ext is None:
        return _IMPORT_ERROR
    if not _ext.has_cuda():
        return "jax_gna was built without CUDA (no nvcc at build time, or JAX_GNA_CUDA=0)"
    if jax.default_backend() != "gpu":
        return f"JAX's default backend is {jax.default_backend()!r}, not a CUDA GPU"
    cc = _default_device_cc()
    if cc is None:
        return f"the default device {jax.devices()[0]} is not a CUDA GPU"
    major, minor = cc
    archs = [int(a) for a in _ext.cuda_sm80_archs().split(",") if a]
    if not any(a // 10 == major and a % 10 <= minor for a in archs):
        return (f"no kernels for compute capability {major}.{minor} in this build "
                f"(sm80 kernels built for {archs})")
    return None


def _default_device_cc() -> tuple[int, int] | None:
    """(major, minor) compute capability of JAX's default device, None if it has none."""
    cc = getattr(jax.devices()[0], "compute_capability", None)
    if cc is None:
        return None
    major, minor = (int(x) for x in str(cc).split(".")[:2])
    return major, minor


def _sm90_backward_runs(head_dim: int) -> bool:
    """Whether a `cuda` backward of this head dim runs the sm90a kernels on the default device
    (cuda_handler.cc's use_sm90 for a problem the kernels support)."""
    if not has_cuda() or head_dim not in (64, 128):
        return False
    cc = _default_device_cc()
    return cc is not None and bool(_ext.cuda_sm90_enabled(10 * cc[0] + cc[1]))


# ----------------------------------------------------------------------------------------
# The static part of a call.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Call:
    """Everything about a call that is not an array (hashable: a static argument)."""

    platform: str                        # "cpu" or "cuda"
    axes: tuple[AxisParams, ...]
    scale: float
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    deterministic: bool
    frames: tuple[geometry.AxisFrame, ...]

    @property
    def rank(self) -> int:
        return len(self.axes)

    def target(self, direction: str) -> str:
        return f"jax_gna_{self.platform}_{direction}"

    def attributes(self) -> dict:
        """The FFI attributes, with the exact types cuda/gna_ffi.h decodes."""
        def i64(values) -> np.ndarray:
            return np.asarray([int(x) for x in values], dtype=np.int64)
        return dict(
            kernel=i64(a.kernel for a in self.axes),
            stride=i64(a.stride for a in self.axes),
            dilation=i64(a.dilation for a in self.axes),
            causal=i64(a.causal for a in self.axes),
            q_tile=i64(self.q_tile),
            kv_tile=i64(self.kv_tile),
            length=i64(a.length for a in self.axes),
            q_offset=i64(f.q_offset for f in self.frames),
            kv_offset=i64(f.kv_offset for f in self.frames),
            scale=np.float32(self.scale),
            deterministic=np.bool_(self.deterministic),
        )


# ----------------------------------------------------------------------------------------
# Raw custom calls (any number of leading dims: the handlers flatten them into the batch).
# ----------------------------------------------------------------------------------------

def _call_forward(c: _Call, q, k, v):
    """``(out, lse)`` from the forward target."""
    out_types = (jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32))
    return tuple(jax.ffi.ffi_call(c.target("forward"), out_types,
                                  vmap_method="broadcast_all")(q, k, v, **c.attributes()))


def _call_backward(c: _Call, q, k, v, out, lse, dout, *dlse):
    """``(dq, dk, dv)`` from the backward target; `dlse` is an optional trailing operand.

    The target's fourth result is the kernels' scratch space, sized here from the (local)
    shapes (and, without ``deterministic``, holding a float32 dq accumulator) and
    dropped.
    """
    attrs = c.attributes()
    workspace = _ext.backward_workspace_bytes(
        c.platform, q.shape, k.shape,
        *(attrs[n].tolist() for n in ("kernel", "stride", "dilation", "causal", "q_tile",
                                      "kv_tile", "length", "q_offset", "kv_offset")),
        deterministic=c.deterministic)
    out_types = (jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct((workspace,), jnp.uint8))
    dq, dk, dv, _ = jax.ffi.ffi_call(c.target("backward"), out_types,
                                     vmap_method="broadcast_all")(
        q, k, v, out, lse, dout, *dlse, **attrs)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------
# Sharding: one rule for both targets, expressed per operand "role".
# ----------------------------------------------------------------------------------------

# Roles: "q" for [*lead, *spatial, H, D] arrays, "kv" for [*lead, *spatial, H_kv, D],
# "row" for [*lead, *spatial, H] (lse, dlse).
_FORWARD_ROLES = (("q", "kv", "kv"), ("q", "row"))


def _backward_roles(with_dlse: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    operands = ("q", "kv", "kv", "q", "row", "q") + (("row",) if with_dlse else ())
    return operands, ("q", "kv", "kv")


def _factors(role: str, lead: int, rank: int, heads: int, kv_heads: int) -> str:
    batch = [f"b{i}" for i in range(lead)]
    # Q-side and K/V-side spatial factors differ: a framed call's buffers differ in size.
    spatial = [f"{'t' if role == 'kv' else 's'}{a}" for a in range(rank)]
    # Query heads are (kv head, head within its group). Shardy rejects size-1 parts of a
    # compound factor, so MHA and MQA name the one non-trivial part alone.
    if heads == kv_heads:
        q_heads = "hk"
    elif kv_heads == 1:
        q_heads = "g"
    else:
        q_heads = "(hk g)"
    heads = {"q": q_heads, "kv": "hk", "row": q_heads}[role]
    tail = [] if role == "row" else ["d"]
    return " ".join(batch + spatial + [heads] + tail)


def _sharding_rule(roles, c: _Call, mesh, operand_types, result_types):
    """Shardy rule: leading dims and kv-head groups shard; spatial, head_dim and the
    query-heads-per-kv-head factor `g` stay whole."""
    del mesh, result_types
    q_shape = operand_types[0].shape
    lead = len(q_shape) - c.rank - 2
    heads, kv_heads = q_shape[-2], operand_types[1].shape[-2]
    operands, results = roles
    rule = (", ".join(_factors(r, lead, c.rank, heads, kv_heads) for r in operands) + " -> " +
            ", ".join(_factors(r, lead, c.rank, heads, kv_heads) for r in results))
    # Listed in order of first appearance in the rule, as Shardy requires: q's spatial
    # factors, its head-group factor, head_dim, then k's spatial factors.
    sizes = {}
    groups = ()
    if heads != kv_heads:
        groups = ("g",)
        if kv_heads > 1:
            sizes["g"] = heads // kv_heads  # only named inside the compound factor
    replicated = (tuple(f"s{a}" for a in range(c.rank)) + groups + ("d",)
                  + tuple(f"t{a}" for a in range(c.rank)))
    return rule, dict(need_replication_factors=replicated, **sizes)


def _mesh_axis_size(mesh, axis) -> int:
    if axis is None:
        return 1
    names = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh.shape[n] for n in names)


def _local_specs(c: _Call, mesh, q_info, kv_heads: int):
    """PartitionSpecs per role: q's batch sharding, q's head sharding if it splits the kv
    heads evenly, nothing else."""
    ndim = len(q_info.shape)
    lead = ndim - c.rank - 2
    spec = (None,) * ndim
    sharding = getattr(q_info, "sharding", None)
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    batch = spec[:lead]
    head = spec[lead + c.rank]
    if kv_heads % _mesh_axis_size(mesh, head):
        head = None
    spatial = (None,) * c.rank
    return {
        "q": PartitionSpec(*batch, *spatial, head, None),
        "kv": PartitionSpec(*batch, *spatial, head, None),
        "row": PartitionSpec(*batch, *spatial, head),
    }


def _partitioned(roles, raw_call):
    """`raw_call(c, *arrays)` under custom_partitioning with the rule above."""

    def shardings(c, mesh, arg_infos):
        specs = _local_specs(c, mesh, arg_infos[0], arg_infos[1].shape[-2])
        operands, results = roles
        return (tuple(NamedSharding(mesh, specs[r]) for r in operands[:len(arg_infos)]),
                tuple(NamedSharding(mesh, specs[r]) for r in results))

    @functools.partial(custom_partitioning, static_argnums=(0,))
    def call(c, *arrays):
        return raw_call(c, *arrays)

    def partition(c, mesh, arg_infos, result_infos):
        del result_infos
        arg_shardings, result_shardings = shardings(c, mesh, arg_infos)

        def lower(*arrays):
            return raw_call(c, *arrays)

        return mesh, lower, result_shardings, arg_shardings

    def infer(c, mesh, arg_infos, result_infos):
        del result_infos
        return shardings(c, mesh, arg_infos)[1]

    call.def_partition(partition=partition, infer_sharding_from_operands=infer,
                       sharding_rule=functools.partial(_sharding_rule, roles))
    return call


_forward_p = _partitioned(_FORWARD_ROLES, _call_forward)
_backward_p = _partitioned(_backward_roles(False), _call_backward)
_backward_dlse_p = _partitioned(_backward_roles(True), _call_backward)


# ----------------------------------------------------------------------------------------
# vmap: fold the mapped axis into the leading dims (the handlers flatten them).
# ----------------------------------------------------------------------------------------

def _batch_folding(fn, c: _Call):
    """`fn(c, *arrays)` as a custom_vmap function of the arrays alone."""

    @jax.custom_batching.custom_vmap
    def call(*arrays):
        return fn(c, *arrays)

    @call.def_vmap
    def rule(axis_size, in_batched, *arrays):
        # Batched arrays carry the mapped axis first; give the others one too. Calling
        # `call` again (not `fn`) keeps nested vmaps working.
        arrays = [x if b else jnp.broadcast_to(x, (axis_size,) + x.shape)
                  for x, b in zip(arrays, in_batched)]
        outs = call(*arrays)
        return outs, tuple(True for _ in outs)

    return call


@functools.lru_cache(maxsize=256)
def _forward(c: _Call):
    return _batch_folding(_forward_p, c)


@functools.lru_cache(maxsize=256)
def _backward(c: _Call, with_dlse: bool):
    return _batch_folding(_backward_dlse_p if with_dlse else _backward_p, c)


# ----------------------------------------------------------------------------------------
# Differentiation.
# ----------------------------------------------------------------------------------------

def _lse_cotangent_by_calls(c: _Call, cb: _Call, q, k, v, out, lse, dlse):
    """The part of (dq, dk) due to an lse cotangent, from the dlse-free targets.

    ``d lse_i / d q_i = scale * sum_j P_ij k_j`` (attention with values = keys) and
    ``d lse_i / d k_j = scale * P_ij q_i``, which is the backward's dv for ``dout = dlse * q``.
    For kernels whose backward takes no lse cotangent (the sm80 interface). `c` is the
    forward's call, `cb` the backward's (`_differentiable`).
    """
    keys_as_values, _ = _forward(c)(q, k, k)
    dq = (c.scale * dlse[..., None]) * keys_as_values.astype(jnp.float32)
    weighted_q = (dlse[..., None] * q.astype(jnp.float32)).astype(q.dtype)
    _, _, dk_as_dv = _backward(cb, False)(q, k, v, out, lse, weighted_q)
    return dq, c.scale * dk_as_dv.astype(jnp.float32)


def _backward_with_cotangents(c: _Call, cb: _Call, residuals, cotangents):
    q, k, v, out, lse = residuals
    dout, dlse = cotangents
    if isinstance(dout, SymbolicZero):
        dout = jnp.zeros(out.shape, out.dtype)
    if isinstance(dlse, SymbolicZero):
        return _backward(cb, False)(q, k, v, out, lse, dout)
    if cb.platform == "cpu":
        return _backward(cb, True)(q, k, v, out, lse, dout, dlse)
    dq, dk, dv = _backward(cb, False)(q, k, v, out, lse, dout)
    extra_dq, extra_dk = _lse_cotangent_by_calls(c, cb, q, k, v, out, lse, dlse)
    return ((dq.astype(jnp.float32) + extra_dq).astype(q.dtype),
            (dk.astype(jnp.float32) + extra_dk).astype(k.dtype), dv)


@functools.lru_cache(maxsize=256)
def _differentiable(c: _Call, cb: _Call):
    """``(q, k, v) -> (out, lse)`` by the forward target of `c`, with the backward target of
    `cb` as its VJP (the two calls may differ in their tile shapes alone)."""

    @jax.custom_vjp
    def attend(q, k, v):
        return _forward(c)(q, k, v)

    def attend_fwd(q, k, v):
        q, k, v = q.value, k.value, v.value  # CustomVJPPrimal (symbolic_zeros=True)
        out, lse = _forward(c)(q, k, v)
        return (out, lse), (q, k, v, out, lse)

    def attend_bwd(residuals, cotangents):
        return tuple(_backward_with_cotangents(c, cb, residuals, cotangents))

    attend.defvjp(attend_fwd, attend_bwd, symbolic_zeros=True)
    return attend


# ----------------------------------------------------------------------------------------
# Implementations.
# ----------------------------------------------------------------------------------------

def attention(q: jax.Array, k: jax.Array, v: jax.Array, axes: Sequence[AxisParams],
              scale: float, *, platform: str, q_tile_shape: Sequence[int] | None = None,
              kv_tile_shape: Sequence[int] | None = None,
              deterministic: bool = False,
              frames: Sequence[geometry.AxisFrame] | None = None
              ) -> tuple[jax.Array, jax.Array]:
    """GNA through the custom call of `platform` ("cpu" or "cuda").

    Args:
      q: ``[B, *spatial, H, D]``; k, v: ``[B, *spatial, H_kv, D]``, validated by `api`.
      axes: one `AxisParams` per spatial axis.
      scale: score scale.
      platform: which handler pair runs; the arrays must live on that platform.
      q_tile_shape, kv_tile_shape: tile shapes in dilation-group indices of both passes;
        default `geometry.default_tile_shapes` for the forward and, on "cuda",
        `geometry.backward_tile_shapes` of the kernels that run for the backward.
      deterministic: bitwise-reproducible gradients (the CPU handler always is).
      frames: per-axis `geometry.AxisFrame`: q and k/v hold these slabs of the global
        problem `axes`; default: the whole axes.

    Returns:
      ``out`` like q, ``lse [B, *spatial, H]`` float32.
    """
    if _ext is None:
        raise ValueError(f"implementation={platform!r} is not available: {_IMPORT_ERROR}")
    axes = tuple(axes)
    head_dim = q.shape[-1]
    default_q, default_kv = geometry.default_tile_shapes(axes, head_dim)
    if frames is None:
        frames = tuple(geometry.AxisFrame.whole(a.length) for a in axes)
    c = _Call(platform=platform, axes=axes, scale=float(scale),
              q_tile=tuple(q_tile_shape) if q_tile_shape is not None else default_q,
              kv_tile=tuple(kv_tile_shape) if kv_tile_shape is not None else default_kv,
              deterministic=bool(deterministic), frames=tuple(frames))
    cb = c
    if platform == "cuda" and q_tile_shape is None and kv_tile_shape is None:
        kernels = "sm90a" if _sm90_backward_runs(head_dim) else "sm80"
        bwd_q, bwd_kv = geometry.backward_tile_shapes(axes, head_dim,
                                                      deterministic=c.deterministic,
                                                      kernels=kernels)
        cb = dataclasses.replace(c, q_tile=bwd_q, kv_tile=bwd_kv)
    return _differentiable(c, cb)(q, k, v)


def cpu_attention(q, k, v, axes, scale, **options):
    """The ``"cpu"`` implementation (signature of `api`): the native C++ handler."""
    return attention(q, k, v, axes, scale, platform="cpu", **options)


def cuda_attention(q, k, v, axes, scale, **options):
    """The ``"cuda"`` implementation (signature of `api`): the CUDA kernels."""
    return attention(q, k, v, axes, scale, platform="cuda", **options)
