"""The GNA configuration object and its validation against a token layout.

`GNAConfig` is what users write; `AxisParams` is what every implementation consumes: one fully
resolved, validated record per spatial axis (window ``-1`` replaced by the axis length,
scalars broadcast). Validation errors name the axis, the parameter and the rule.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Sequence, Union

IntOrTuple = Union[int, Sequence[int]]
BoolOrTuple = Union[bool, Sequence[bool]]

MAX_RANK = 3


def _as_tuple(name: str, value, kind: type) -> tuple:
    """Normalise a scalar or a sequence to a tuple of `kind`, rejecting other types."""
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not items:
        raise ValueError(f"{name} must not be empty")
    out = []
    for i, item in enumerate(items):
        if kind is bool:
            if not isinstance(item, (bool, numbers.Integral)) or item not in (0, 1):
                raise TypeError(f"{name}[{i}]={item!r} must be a bool")
            out.append(bool(item))
        else:
            if isinstance(item, bool) or not isinstance(item, numbers.Integral):
                raise TypeError(f"{name}[{i}]={item!r} must be an int")
            out.append(int(item))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class GNAConfig:
    """Generalized neighborhood attention parameters, per spatial axis.

    Each field is a scalar (broadcast to every spatial axis) or a tuple with one entry per
    axis. The config is frozen and hashable, so it can be a static argument of `jax.jit`.

    Attributes:
      kernel_size: window size ``k >= 2`` per axis; ``-1`` means the whole axis.
      stride: ``1 <= s <= k``; queries in groups of ``s`` share their leader's window.
      dilation: ``d >= 1`` with ``k * d <= L``.
      is_causal: per-axis causal flag; a causal window ends at the query itself.
    """

    kernel_size: IntOrTuple
    stride: IntOrTuple = 1
    dilation: IntOrTuple = 1
    is_causal: BoolOrTuple = False

    def __post_init__(self):
        # Normalise lists to tuples so that the config stays hashable.
        for name, kind in (("kernel_size", int), ("stride", int), ("dilation", int),
                           ("is_causal", bool)):
            value = getattr(self, name)
            items = _as_tuple(name, value, kind)
            if isinstance(value, (tuple, list)):
                object.__setattr__(self, name, items)
            else:
                object.__setattr__(self, name, items[0])
        lengths = {len(t) for t in self._fields() if len(t) > 1}
        if len(lengths) > 1:
            raise ValueError(
                "kernel_size, stride, dilation and is_causal must have the same number of "
                f"axes; got {self.kernel_size!r}, {self.stride!r}, {self.dilation!r}, "
                f"{self.is_causal!r}")
        if any(len(t) > MAX_RANK for t in self._fields()):
            raise ValueError(f"GNAConfig supports at most {MAX_RANK} spatial axes")

    def _fields(self) -> tuple[tuple, ...]:
        return tuple(_as_tuple(n, getattr(self, n), bool if n == "is_causal" else int)
                     for n in ("kernel_size", "stride", "dilation", "is_causal"))

    @property
    def rank(self) -> int | None:
        """The number of axes the config names, or None if every field is a scalar."""
        lengths = {len(t) for t in self._fields() if len(t) > 1}
        if lengths:
            return lengths.pop()
        explicit = any(isinstance(getattr(self, n), tuple)
                       for n in ("kernel_size", "stride", "dilation", "is_causal"))
        return 1 if explicit else None

    def resolve(self, spatial_shape: Sequence[int]) -> tuple["AxisParams", ...]:
        """Validates the config against `spatial_shape` and returns one `AxisParams` per axis.

        Raises:
          ValueError: rank mismatch, or a per-axis rule is broken (the message names the
            axis, the parameter and the rule).
        """
        return resolve(self, tuple(spatial_shape))


@dataclasses.dataclass(frozen=True)
class AxisParams:
    """One spatial axis of a validated GNA problem (all values resolved)."""

    length: int
    kernel: int
    stride: int
    dilation: int
    causal: bool


def resolve(cfg: GNAConfig, spatial_shape: tuple[int, ...]) -> tuple[AxisParams, ...]:
    """See `GNAConfig.resolve`."""
    rank = len(spatial_shape)
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"GNA supports 1 to {MAX_RANK} spatial axes, got {rank} "
                         f"(spatial shape {spatial_shape})")
    if cfg.rank is not None and cfg.rank != rank:
        raise ValueError(f"GNAConfig has {cfg.rank} axes but the input has {rank} spatial "
                         f"axes (spatial shape {spatial_shape})")
    kernels, strides, dilations, causals = (
        t * rank if len(t) == 1 else t for t in cfg._fields())
    axes = []
    for a, length in enumerate(spatial_shape):
        if length < 1:
            raise ValueError(f"spatial axis {a} has length {length}; it must be >= 1")
        k, s, d, c = kernels[a], strides[a], dilations[a], causals[a]
        if d < 1:
            raise ValueError(f"dilation[{a}]={d} must be >= 1")
        if k == -1:
            if d != 1:
                raise ValueError(f"kernel_size[{a}]=-1 (whole axis) requires dilation[{a}]=1,"
                                 f" got {d}")
            k = length
        if k < 2:
            raise ValueError(f"kernel_size[{a}]={k} must be >= 2 (or -1 for the whole axis)")
        if s < 1:
            raise ValueError(f"stride[{a}]={s} must be >= 1")
        if s > k:
            raise ValueError(f"stride[{a}]={s} must be <= kernel_size[{a}]={k}")
        if k * d > length:
            raise ValueError(f"kernel_size[{a}]*dilation[{a}]={k}*{d}={k * d} must be <= the "
                             f"axis length {length}")
        axes.append(AxisParams(length=length, kernel=k, stride=s, dilation=d, causal=c))
    return tuple(axes)
