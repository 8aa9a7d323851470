"""Spatial context parallelism: GNA with one spatial axis sharded across devices.

GNA is local, so a device that owns a slab of queries needs the keys and values of its slab
plus a *halo*: the rows of its neighbours' slabs that its queries' windows reach. The halo
sizes come from the shared geometry (`geometry.kv_span`, clamped border windows and causal
axes included). Inside `jax.shard_map` each device

1. receives the last ``left`` rows of the previous device's K/V and the first ``right`` rows
   of the next device's through `jax.lax.ppermute` (the first and last devices receive
   zeros, which lie outside the axis and are never seen);
2. runs the local kernel on a *frame* (`geometry.AxisFrame`): device ``s`` computes the
   queries of global rows ``[bounds[s], bounds[s + 1])`` against its K/V buffer, which holds
   global rows ``[s * n - left, (s + 1) * n + right)``. Windows therefore clamp at the
   global borders, not at the slab's. Frame offsets are static kernel attributes, so the
   devices' calls are the branches of one `jax.lax.switch` on the device index.

The ``bounds`` are the slab borders ``s * n``, moved to stride-group borders where that is
cheap; a device then borrows the few query rows this adds from a neighbour and sends their
outputs back (`HaloPlan`). Each K/V frame starts on a KV-tile multiple. Together these make
every device's tiles those of the one-device call where the borders allow it: on the
30x48x80 problems on 2 H200s the sharded `cuda` forward was bitwise equal to the
one-device call.

Gradients need nothing extra: the transpose of `ppermute` sends the halo rows' dk/dv back
to their owners, where they are added. If a halo is longer than a slab (small slabs, wide
windows), K/V are all-gathered along the axis instead, with a warning; the queries (and the
compute) stay split.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jax_gna import api, geometry
from jax_gna.config import AxisParams, GNAConfig


@dataclasses.dataclass(frozen=True)
class HaloPlan:
    """How K/V rows move when spatial axis `axis` is split into `shards` slabs.

    Attributes:
      axis: the sharded spatial axis (0-based among the spatial axes).
      shards: number of slabs (devices along the mesh axis).
      slab: rows per slab, ``L // shards``.
      left, right: K/V halo rows each device receives from its previous / next neighbour
        (the largest need over all devices, rounded up to a multiple of the dilation).
      gather: True if a halo is longer than a slab: K/V are all-gathered instead.
      bounds: device ``s`` computes the queries ``[bounds[s], bounds[s + 1])``. These are
        the slab borders moved to the nearest multiple of ``stride * dilation`` when that
        moves none by more than an eighth of a slab: a border inside a stride group gives
        the kernel a Q tile whose rows straddle two windows (a wider, masked KV box) and
        makes both neighbours fetch the whole window of the straddled group.
      q_left, q_right: query rows a device borrows from its previous / next neighbour to
        compute up to its bounds (their outputs go back to the owners).
    """

    axis: int
    shards: int
    slab: int
    left: int
    right: int
    gather: bool
    bounds: tuple[int, ...] = ()
    q_left: int = 0
    q_right: int = 0

    def frames(self, axes: Sequence[AxisParams], shard: int,
               kv_align: int = 1) -> tuple[geometry.AxisFrame, ...]:
        """The per-axis frames of device `shard`'s local call.

        The K/V frame starts at the last multiple of `kv_align` (tokens) at or before the
        first key the device needs, if its buffer holds that row: KV tiles then line up
        with the unsharded call's (a shifted tiling adds a partial, masked tile per window).
        """
        frames = [geometry.AxisFrame.whole(a.length) for a in axes]
        q0, q1 = self.bounds[shard], self.bounds[shard + 1]
        if self.gather:
            frames[self.axis] = geometry.AxisFrame(q0, q1 - q0, 0, axes[self.axis].length)
        else:
            k0, k1 = self.kv_buffer(shard)
            lo, _ = geometry.kv_span(axes[self.axis], q0, q1)
            start = max(lo // kv_align * kv_align, k0)
            frames[self.axis] = geometry.AxisFrame(q0, q1 - q0, start, k1 - start)
        return tuple(frames)

    def kv_buffer(self, shard: int) -> tuple[int, int]:
        """Global rows ``[k0, k1)`` of the device's K/V buffer after the halo exchange."""
        return shard * self.slab - self.left, (shard + 1) * self.slab + self.right

    def q_rows(self, shard: int) -> tuple[int, int]:
        """Rows ``[lo, hi)`` of the device's extended Q buffer (``q_left`` borrowed rows,
        its slab, ``q_right`` borrowed rows) that its call computes."""
        start = shard * self.slab - self.q_left
        return self.bounds[shard] - start, self.bounds[shard + 1] - start


def plan_halo(axes: Sequence[AxisParams], axis: int, shards: int) -> HaloPlan:
    """The `HaloPlan` of splitting spatial axis `axis` of the problem `axes` into `shards`.

    Raises:
      ValueError: the axis length is not a multiple of `shards`, or a slab is not a
        multiple of the axis's dilation (a slab must start at dilation group 0).
    """
    if not 0 <= axis < len(axes):
        raise ValueError(f"spatial_axis={axis} must be in [0, {len(axes)})")
    a = axes[axis]
    if a.length % shards:
        raise ValueError(f"spatial axis {axis} has length {a.length}, which {shards} devices "
                         "cannot split evenly; its length must be a multiple of the mesh "
                         "axis size")
    slab = a.length // shards
    d = a.dilation
    if slab % d:
        raise ValueError(f"spatial axis {axis}: each device's slab of {slab} rows must be a "
                         f"multiple of the dilation {d}")
    align = a.stride * d
    bounds = [0] + [s * slab for s in range(1, shards)] + [a.length]
    moved = [0] + [round(b / align) * align for b in bounds[1:-1]] + [a.length]
    if all(abs(m - b) * 8 <= slab for m, b in zip(moved, bounds)) and all(
            x < y for x, y in zip(moved, moved[1:])):
        bounds = moved
    q_left = max(s * slab - bounds[s] for s in range(shards))
    q_right = max(bounds[s + 1] - (s + 1) * slab for s in range(shards))
    left = right = 0
    for s in range(shards):
        lo, hi = geometry.kv_span(a, bounds[s], bounds[s + 1])
        left = max(left, s * slab - lo)
        right = max(right, hi - (s + 1) * slab)
    left, right = -(-left // d) * d, -(-right // d) * d
    gather = shards > 1 and max(left, right) > slab
    if gather:
        left = right = 0
    return HaloPlan(axis=axis, shards=shards, slab=slab, left=left, right=right,
                    gather=gather, bounds=tuple(bounds), q_left=max(q_left, 0),
                    q_right=max(q_right, 0))


def _extend(x: jax.Array, left: int, right: int, n: int, axis_name: str,
            dim: int) -> jax.Array:
    """A device's slab with the last `left` rows of the previous device's slab before it and
    the first `right` rows of the next one's after it (zeros where there is no neighbour);
    inside `shard_map`."""
    slab = x.shape[dim]
    parts = []
    if left:
        tail = jax.lax.slice_in_dim(x, slab - left, slab, axis=dim)
        parts.append(jax.lax.ppermute(tail, axis_name, [(i, i + 1) for i in range(n - 1)]))
    parts.append(x)
    if right:
        head = jax.lax.slice_in_dim(x, 0, right, axis=dim)
        parts.append(jax.lax.ppermute(head, axis_name, [(i + 1, i) for i in range(n - 1)]))
    return jnp.concatenate(parts, axis=dim) if len(parts) > 1 else x


def _with_halo(x: jax.Array, plan: HaloPlan, axis_name: str, dim: int) -> jax.Array:
    """A device's K or V slab extended by its halos (inside `shard_map`)."""
    if plan.gather:
        return jax.lax.all_gather(x, axis_name, axis=dim, tiled=True)
    return _extend(x, plan.left, plan.right, plan.shards, axis_name, dim)


def _return_borrowed(x: jax.Array, plan: HaloPlan, axis_name: str, dim: int) -> jax.Array:
    """Inverse of extending by the borrowed query rows: an extended buffer that is zero
    except on the rows this device computed -> its own slab, with the rows its neighbours
    computed for it added in (each row is computed by exactly one device, so the sum is
    exact)."""
    n, slab, ql, qr = plan.shards, plan.slab, plan.q_left, plan.q_right
    own = jax.lax.slice_in_dim(x, ql, ql + slab, axis=dim)
    pad = [(0, 0)] * x.ndim
    if qr:   # rows past my slab belong to the next device: they become its first qr rows
        sent = jax.lax.slice_in_dim(x, ql + slab, ql + slab + qr, axis=dim)
        got = jax.lax.ppermute(sent, axis_name, [(i, i + 1) for i in range(n - 1)])
        pad[dim] = (0, slab - qr)
        own = own + jnp.pad(got, pad)
    if ql:   # rows before my slab belong to the previous device: its last ql rows
        sent = jax.lax.slice_in_dim(x, 0, ql, axis=dim)
        got = jax.lax.ppermute(sent, axis_name, [(i + 1, i) for i in range(n - 1)])
        pad[dim] = (slab - ql, 0)
        own = own + jnp.pad(got, pad)
    return own


def sharded_attention(q: jax.Array, k: jax.Array, v: jax.Array, cfg: GNAConfig, *,
                      mesh: Mesh, axis_name: str, spatial_axis: int = 0,
                      batch_axis_name: str | None = None,
                      head_axis_name: str | None = None,
                      scale: float | None = None, implementation: str | None = None,
                      return_lse: bool = False,
                      q_tile_shape: Sequence[int] | None = None,
                      kv_tile_shape: Sequence[int] | None = None,
                      deterministic: bool = False):
    """`jax_gna.attention` with spatial axis `spatial_axis` split over mesh axis `axis_name`.

    Each device computes the queries of its slab; K/V move only as halos (see the module
    docstring). The result equals `jax_gna.attention` on the whole arrays, forward and
    gradients. Works eagerly and under `jax.jit`; the inputs may have any sharding (they are
    resharded to the layout below) and the outputs come back in that layout.

    Args:
      q: ``[B, *spatial, H, D]``; k, v: ``[B, *spatial, H_kv, D]`` (global shapes).
      cfg: the `GNAConfig` of the global problem.
      mesh: the device mesh.
      axis_name: mesh axis that splits ``spatial[spatial_axis]``; its length must be a
        multiple of the mesh axis size, and each slab a multiple of the axis's dilation.
      spatial_axis: which spatial axis to split (0 = the first, outermost one).
      batch_axis_name, head_axis_name: optional other mesh axes that split the batch and the
        (kv) heads; these need no communication.
      scale, implementation, return_lse, q_tile_shape, kv_tile_shape, deterministic: as in
        `jax_gna.attention` (no additional keys).

    Returns:
      ``out`` (or ``(out, lse)``), sharded like the inputs' layout
      ``P(batch_axis_name, ..axis_name at spatial_axis.., head_axis_name, None)``.

    Raises:
      ValueError, TypeError: bad inputs, config, mesh axes or splits, before anything runs.

    Warns:
      UserWarning: when a halo is longer than a slab and K/V are all-gathered instead.
    """
    axes, scale, q_tile, kv_tile = api._check_call(q, k, v, cfg, scale, q_tile_shape,
                                                   kv_tile_shape)
    rank = len(axes)
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    for name, value in (("axis_name", axis_name), ("batch_axis_name", batch_axis_name),
                        ("head_axis_name", head_axis_name)):
        if value is not None and value not in mesh.shape:
            raise ValueError(f"{name}={value!r} is not an axis of the mesh "
                             f"{tuple(mesh.shape)}")
    if axis_name is None:
        raise ValueError("axis_name must name the mesh axis that splits the spatial axis")
    if isinstance(spatial_axis, bool) or not isinstance(spatial_axis, int):
        raise TypeError(f"spatial_axis must be an int, got {type(spatial_axis).__name__}")
    names = [n for n in (axis_name, batch_axis_name, head_axis_name) if n is not None]
    if len(set(names)) != len(names):
        raise ValueError(f"axis_name, batch_axis_name and head_axis_name must differ, got "
                         f"{names}")
    if batch_axis_name is not None and q.shape[0] % mesh.shape[batch_axis_name]:
        raise ValueError(f"batch {q.shape[0]} is not a multiple of mesh axis "
                         f"{batch_axis_name!r} ({mesh.shape[batch_axis_name]} devices)")
    if head_axis_name is not None and k.shape[-2] % mesh.shape[head_axis_name]:
        raise ValueError(f"kv heads H_kv={k.shape[-2]} are not a multiple of mesh axis "
                         f"{head_axis_name!r} ({mesh.shape[head_axis_name]} devices)")
    plan = plan_halo(axes, spatial_axis, mesh.shape[axis_name])
    if plan.gather:
        warnings.warn(
            f"sharded_attention: windows on spatial axis {spatial_axis} reach further than "
            f"one device's slab ({plan.slab} rows); K/V are all-gathered along "
            f"{axis_name!r} instead of exchanging halos", stacklevel=2)
    impl = api._pick(implementation, q.dtype)

    spatial = [None] * rank
    spatial[spatial_axis] = axis_name
    spec = PartitionSpec(batch_axis_name, *spatial, head_axis_name, None)
    row_spec = PartitionSpec(batch_axis_name, *spatial, head_axis_name)
    dim = 1 + spatial_axis
    options = dict(q_tile_shape=q_tile, kv_tile_shape=kv_tile,
                   deterministic=bool(deterministic))

    borrowed = plan.q_left + plan.q_right > 0
    arch = "xla" if impl.name == "xla" else "sm80"
    tile = kv_tile or geometry.default_tile_shapes(axes, q.shape[-1], arch)[1]
    kv_align = tile[spatial_axis] * axes[spatial_axis].dilation

    def branch(shard: int):
        frames = plan.frames(axes, shard, kv_align)
        lo, hi = plan.q_rows(shard)
        extended = plan.q_left + plan.slab + plan.q_right
        k_lo = frames[spatial_axis].kv_offset - plan.kv_buffer(shard)[0]

        def call(ql, kl, vl):
            ql = jax.lax.slice_in_dim(ql, lo, hi, axis=dim)
            if k_lo and not plan.gather:
                kl, vl = (jax.lax.slice_in_dim(x, k_lo, x.shape[dim], axis=dim)
                          for x in (kl, vl))
            out, lse = impl.fn(ql, kl, vl, axes, float(scale), frames=frames, **options)
            if borrowed:   # back into the uniform extended layout, zeros elsewhere
                out, lse = (jnp.pad(x, [(0, 0)] * dim + [(lo, extended - hi)]
                                    + [(0, 0)] * (x.ndim - dim - 1)) for x in (out, lse))
            return out, lse
        return call

    def local(ql, kl, vl):
        kl = _with_halo(kl, plan, axis_name, dim)
        vl = _with_halo(vl, plan, axis_name, dim)
        ql = _extend(ql, plan.q_left, plan.q_right, plan.shards, axis_name, dim)
        index = jax.lax.axis_index(axis_name)
        out, lse = jax.lax.switch(index, [branch(s) for s in range(plan.shards)], ql, kl, vl)
        if borrowed:
            out, lse = (_return_borrowed(x, plan, axis_name, dim) for x in (out, lse))
        return out, lse

    out, lse = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec),
                             out_specs=(spec, row_spec), check_vma=False)(q, k, v)
    return (out, lse) if return_lse else out
