"""Planning: what each parameter's math looks like, and which parameters share a bucket.

A bucket is a set of parameters whose SOAP step is the same computation up to the data, so their state can be
stacked into [B, ...] tensors and updated by batched kernels: same device, dtype and shape, the same merged shape
and preconditioned axes (docs/spec.md §5). Parameters that refresh on the same calls (same period and phase of
their refresh clock, §8) share a bucket, so a refresh graph refreshes whole buckets. Buckets are always formed
from scratch over every initialised parameter, in parameter order: the same parameters give the same buckets,
whatever the history (a resumed run runs the same kernels as an uninterrupted one).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .validation import state_dtype


class Layout(NamedTuple):
    """How one parameter is seen by the math (spec §5)."""

    shape: tuple[int, ...]  # the parameter's own shape
    merged_shape: tuple[int, ...]  # the shape the factors are built on
    channels_last: bool  # a 4-D NHWC tensor permuted to NCHW before merging
    factor_sizes: tuple[Optional[int], ...]  # per merged axis: factor size, or None (identity on that axis)


class BucketPlan(NamedTuple):
    """Static description of one bucket: everything the compiled step specialises on."""

    layout: Layout
    param_dtype: torch.dtype
    state_dtype: torch.dtype
    size: int  # B, the number of stacked parameters


def merge_shape(shape: tuple[int, ...], max_precond_dim: int) -> tuple[int, ...]:
    """Spec §5: walk the axes left to right, merging while the running product stays <= max_precond_dim."""
    out: list[int] = []
    run = 1
    for s in shape:
        if run * s <= max_precond_dim:
            run *= s
        elif run > 1:
            out.append(run)
            run = s
        else:
            out.append(s)
    if run > 1 or not out:
        out.append(run)
    return tuple(out)


def layout_of(shape: tuple[int, ...], group: dict) -> Layout:
    """The layout of a parameter of this shape under a param group's structural options."""
    shape = tuple(shape)
    limit = group["max_precond_dim"]
    if len(shape) == 1:
        # 1-D parameters are never merged; they get a factor only with precondition_1d.
        size = shape[0] if group["precondition_1d"] and shape[0] <= limit else None
        return Layout(shape, shape, False, (size,))
    channels_last = group["merge_dims"] and group["data_format"] == "channels_last" and len(shape) == 4
    if group["merge_dims"]:
        nchw = (shape[0], shape[3], shape[1], shape[2]) if channels_last else shape
        merged = merge_shape(nchw, limit)
    else:
        merged = shape
    return Layout(shape, merged, channels_last, tuple(s if s <= limit else None for s in merged))


def to_merged(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[B, *shape] -> [B, *merged_shape]."""
    return merge(x, layout.merged_shape, layout.channels_last)


def from_merged(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[B, *merged_shape] -> [B, *shape] (a view where possible)."""
    return unmerge(x, layout.shape, layout.channels_last)


def merge(x: torch.Tensor, merged_shape, channels_last: bool) -> torch.Tensor:
    """`to_merged` with the sizes given apart from a Layout: the stacked step passes them as a tensor's (symbolic)
    sizes, so that a per-kind trace keeps them symbolic (Python ints would be constants)."""
    if channels_last:
        x = x.permute(0, 1, 4, 2, 3)
    return x.reshape(x.shape[0], *merged_shape)


def unmerge(x: torch.Tensor, shape, channels_last: bool) -> torch.Tensor:
    """`from_merged` with the sizes given apart from a Layout (see `merge`)."""
    if channels_last:
        n, h, w, c = shape
        return x.reshape(x.shape[0], n, c, h, w).permute(0, 1, 3, 4, 2)
    return x.reshape(x.shape[0], *shape)


class BucketKey(NamedTuple):
    """Parameters with equal keys are stacked together."""

    device: torch.device
    dtype: torch.dtype
    layout: Layout
    frequency: int
    phase: int  # refresh_clock % frequency when the buckets were formed


def bucket_key(p: torch.Tensor, group: dict, frequency: int, refresh_clock: int) -> BucketKey:
    return BucketKey(p.device, p.dtype, layout_of(p.shape, group), frequency, refresh_clock % frequency)


def make_plan(key: BucketKey, size: int) -> BucketPlan:
    return BucketPlan(key.layout, key.dtype, state_dtype(key.dtype), size)
