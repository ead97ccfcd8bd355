"""Ownership (planning for the sharded mode): which rank owns which parameter, from the cost model.

Every parameter ("item") has one owner among the W ranks of a process group; the owner keeps the item's whole SOAP
state and runs its whole step, plain and refresh (docs/distributed.md §1). Items of one class (same shape, dtype and
amortised cost) are dealt out floor(n/W) per rank, and the remaining ones one at a time to the least-loaded rank,
the costliest classes first. A rank's load is then at most total/W plus the largest item (list scheduling's bound:
the last item a rank took came to it when it was the least loaded, i.e. at or below the mean). Pure functions of
the parameter list: every rank computes the same owners without communicating.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Optional

import torch

from .orthogonalization import flops as orthogonalization_flops
from .planning import layout_of
from .validation import state_dtype

ELEMENTWISE_FLOPS = 20  # per element and step: the Adam arithmetic, so that unfactored items weigh something too


def item_flops(shape, group: dict) -> float:
    """Amortised FLOPs of one item's step (docs/design.md §4): 3 units per plain step; a refresh, once every
    precondition_frequency calls, 2 units more plus F·Q (2 s³) and the QR per factor."""
    layout = layout_of(tuple(shape), group)
    n = math.prod(layout.shape)
    sizes = [s for s in layout.factor_sizes if s]
    unit = sum(2 * s * n for s in sizes)
    refresh = 2 * unit + sum(2 * s ** 3 + orthogonalization_flops("householder", s) for s in sizes)
    return 3 * unit + refresh / group["precondition_frequency"] + ELEMENTWISE_FLOPS * n


def state_bytes(shape, dtype: torch.dtype, group: dict) -> int:
    """Bytes of one item's SOAP state: both moments, and a factor and an eigenbasis per factored axis."""
    layout = layout_of(tuple(shape), group)
    n = math.prod(layout.shape)
    return (2 * n + 2 * sum(s * s for s in layout.factor_sizes if s)) * state_dtype(dtype).itemsize


def assign_owners(costs: list, classes: list, world: int, loads: Optional[list] = None) -> list:
    """Owner rank of each item. Items with equal `classes` entries are interchangeable (same cost); `loads` are the
    ranks' loads before these items (items already owned keep their owners: state never moves)."""
    loads = list(loads) if loads is not None else [0.0] * world
    members: dict = defaultdict(list)
    for i, c in enumerate(classes):
        members[c].append(i)
    owners = [0] * len(costs)
    for c in sorted(members, key=lambda c: (-costs[members[c][0]], members[c][0])):
        idx, cost = members[c], costs[members[c][0]]
        per_rank = len(idx) // world
        for r in range(world):
            for i in idx[r * per_rank:(r + 1) * per_rank]:
                owners[i] = r
            loads[r] += per_rank * cost
        for i in idx[world * per_rank:]:
            r = min(range(world), key=lambda k: (loads[k], k))
            owners[i] = r
            loads[r] += cost
    return owners


def plan_ownership(params: list, groups: list, previous: dict, world: int) -> list:
    """Owner rank of each parameter (`groups`: each one's param group). Owners in `previous` ({parameter: rank})
    are kept, since state never moves between ranks; the other parameters are assigned on top of their loads."""
    costs = [item_flops(p.shape, g) for p, g in zip(params, groups)]
    loads = [0.0] * world
    for p, c in zip(params, costs):
        if p in previous:
            loads[previous[p]] += c
    new = [i for i, p in enumerate(params) if p not in previous]
    assigned = assign_owners([costs[i] for i in new], [(tuple(params[i].shape), params[i].dtype, costs[i])
                                                       for i in new], world, loads)
    owners = [previous.get(p) for p in params]
    for i, r in zip(new, assigned):
        owners[i] = r
    return owners


def saved_owners(saved_by, world: int, n_params: int) -> Optional[list]:
    """The owners a sharded state_dict records (its "shard" entry), when they apply to a group of `world` ranks and
    `n_params` parameters; else None."""
    if not isinstance(saved_by, dict) or saved_by.get("world_size") != world:
        return None
    owners = saved_by.get("owners")
    if not isinstance(owners, list) or len(owners) != n_params:
        return None
    if not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < world for r in owners):
        raise ValueError(f"cannot load SOAP state_dict: its shard owners {owners!r} are not ranks of a "
                         f"{world}-rank group")
    return owners
