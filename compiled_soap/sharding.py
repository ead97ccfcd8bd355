"""Sharding over ranks: which rank owns which parameter (planning), and the collectives around the step.

Every parameter ("item") has one owner among the W ranks of a process group. The owner keeps the item's whole SOAP
state and runs its whole step, plain and refresh; the other ranks keep nothing for it (docs/distributed.md).

Ownership is planned from the cost model (docs/design.md §4): items of one class (same shape, dtype and amortised
cost) are dealt out floor(n/W) per rank, and the remaining ones one at a time to the least-loaded rank, the costliest
classes first. A rank's load is then at most total/W plus the largest item (list scheduling's bound: the last item a
rank took came to it when it was the least loaded, i.e. at or below the mean).

The collectives run directly around the compiled step, not inside it: the graph stays exactly the single-process
graph of the rank's own buckets (same plans whatever W, no recompilation when the world changes), and it is the same
code on gloo, where this is tested, and NCCL. Per class of same-shape, same-dtype parameters, one collective:
- replicated parameters (DDP, or plain tensors on every rank): after the step, `all_gather_into_tensor` of the
  owners' updated parameters, stacked, m slots per rank (m = the most items of the class any rank owns);
- DTensor parameters sharded on dim 0 (FSDP2): before the step, one `all_to_all_single` gives each owner every
  rank's dim-0 shard of its items' parameters and gradients, which it joins into full tensors ("proxies" the shell
  treats as its parameters); after the step, one `all_to_all_single` returns to every rank its rows of the update.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from .planning import layout_of
from .validation import state_dtype

ELEMENTWISE_FLOPS = 20  # per element and step: the Adam arithmetic, so that unfactored items weigh something too
QR_FLOPS_PER_S3 = 8 / 3  # Householder geqrf + orgqr (orthogonalization.flops)
# all_gather_into_tensor was renamed all_gather_single (torch 2.13); torch 2.11 has only the old name
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# ------------------------------------------------------------------------------------------------------ planning


def item_flops(shape, group: dict) -> float:
    """Amortised FLOPs of one item's step (docs/design.md §4): 3 units per plain step; a refresh, once every
    precondition_frequency calls, 2 units more plus F·Q (2 s³) and the QR per factor."""
    layout = layout_of(tuple(shape), group)
    n = math.prod(layout.shape)
    sizes = [s for s in layout.factor_sizes if s]
    unit = sum(2 * s * n for s in sizes)
    refresh = 2 * unit + sum((2 + QR_FLOPS_PER_S3) * s ** 3 for s in sizes)
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


# ------------------------------------------------------------------------------------------------------ groups


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover (a torch built without distributed)
        return False
    return isinstance(t, DTensor)


def shard_group(params: list, process_group):
    """The group the work is sharded over: `process_group` (a ProcessGroup or a 1-D DeviceMesh), else the mesh
    dimension DTensor parameters are sharded on, else the default group."""
    if process_group is not None:
        if hasattr(process_group, "get_group"):  # a DeviceMesh
            if process_group.ndim != 1:
                raise ValueError("process_group: pass a 1-D DeviceMesh (the dimension to shard SOAP's work over), "
                                 f"got a {process_group.ndim}-D mesh")
            return process_group.get_group()
        return process_group
    dtensors = [p for p in params if is_dtensor(p)]
    if dtensors:
        return dtensors[0].device_mesh.get_group(_shard_dim(dtensors[0]))
    return dist.group.WORLD


def _shard_dim(p) -> int:
    """The mesh dimension a DTensor parameter is sharded on (Shard(0)); every other mesh dimension must replicate."""
    from torch.distributed.tensor import Replicate, Shard

    dims = [d for d, pl in enumerate(p.placements) if isinstance(pl, Shard)]
    if len(dims) != 1 or p.placements[dims[0]].dim != 0 or \
            any(not isinstance(pl, (Shard, Replicate)) for pl in p.placements):
        raise ValueError(f"CompiledSOAP shards DTensor parameters sharded on dim 0 over one mesh dimension (FSDP2's "
                         f"fully_shard, HSDP), got placements {p.placements}")
    return dims[0]


class Signature(NamedTuple):
    shapes: list
    dtypes: list
    dtensor: list


def check_same_parameters(params: list, group) -> None:
    """Every rank must shard the same parameters. Plain tensors must also be equal on every rank (replicas, as DDP
    keeps them): a wrapper that gives each rank its own subset (ZeroRedundancyOptimizer) needs shard=False, and
    same-shaped subsets would otherwise pass unnoticed. One all_gather of a checksum per parameter, at set-up."""
    mine = Signature([tuple(p.shape) for p in params], [str(p.dtype) for p in params],
                     [is_dtensor(p) for p in params])
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    advice = ("Pass shard=False where each rank optimises its own parameters "
              "(ZeroRedundancyOptimizer(optimizer_class=CompiledSOAP, shard=False, ...)).")
    for rank, theirs in enumerate(everyone):
        if theirs != mine:
            raise ValueError(f"CompiledSOAP(shard=True) needs the same parameters (shapes, dtypes) on every rank of "
                             f"its process group, and rank {rank} has others. {advice}")
    plain = [p for p in params if not is_dtensor(p)]
    if plain:
        device = plain[0].device
        weights = [torch.linspace(1, 2, p.numel(), dtype=torch.float64, device=device) for p in plain]
        sums = torch.stack([(p.detach().reshape(-1).double() * w).sum() for p, w in zip(plain, weights)])
        gathered = torch.empty(dist.get_world_size(group) * len(plain), dtype=torch.float64, device=device)
        _all_gather(gathered, sums, group=group)
        gathered = gathered.view(-1, len(plain))
        differ = (gathered != sums).any(0).nonzero().flatten().tolist()
        if differ:
            raise ValueError(f"CompiledSOAP(shard=True): parameters {differ} differ between the ranks of its process "
                             f"group; sharding steps replicated parameters (DDP). {advice}")


# ------------------------------------------------------------------------------------------------------ exchange


class _Class(NamedTuple):
    members: list  # parameter indices of this shape and dtype, in parameter order
    owned: list  # per rank, its members (in order)
    slots: int  # m: the most members any rank owns


class Exchange:
    """The collectives that move parameters (and, for DTensors, gradients) between owners and everyone else."""

    def __init__(self, params: list, owners: list, group):
        self.group, self.rank, self.world = group, dist.get_rank(group), dist.get_world_size(group)
        self.params, self.owners = params, owners
        self.dtensor = bool(params) and is_dtensor(params[0])
        if any(is_dtensor(p) != self.dtensor for p in params):
            raise ValueError("CompiledSOAP cannot mix DTensor and plain tensor parameters in one optimizer")
        by_kind: dict = defaultdict(list)
        for i, p in enumerate(params):
            by_kind[(tuple(p.shape), p.dtype)].append(i)
        self.classes = []
        for idx in by_kind.values():
            owned = [[i for i in idx if owners[i] == r] for r in range(self.world)]
            self.classes.append(_Class(idx, owned, max(len(o) for o in owned)))
        self.proxies: dict = {}  # DTensor mode: index -> full plain tensor standing for the parameter
        if self.dtensor:
            for i, p in enumerate(params):
                if p.device_mesh.size(_shard_dim(p)) != self.world:
                    raise ValueError(f"parameter {i} is sharded over {p.device_mesh.size(_shard_dim(p))} ranks, "
                                     f"the optimizer's process group has {self.world}")
                if owners[i] == self.rank:
                    self.proxies[i] = torch.empty(p.shape, dtype=p.dtype, device=p.to_local().device)

    def targets(self) -> list:
        """What the shell steps for each parameter: the parameter itself, or (DTensor) its full proxy."""
        return [self.proxies.get(i) for i in range(len(self.params))] if self.dtensor else list(self.params)

    # ---------------------------------------------------------------- DTensor parameters

    def _rows(self, p) -> int:
        return -(-p.shape[0] // self.world)  # torch.chunk's rows per rank (FSDP2's dim-0 sharding)

    def _local(self, t, i: int):
        local = t.to_local()
        p = self.params[i]
        rows = min(self._rows(p), max(0, p.shape[0] - self.rank * self._rows(p)))
        if local.shape[0] != rows or tuple(local.shape[1:]) != tuple(p.shape[1:]):
            raise ValueError(f"parameter {i}: its local shard has shape {tuple(local.shape)}, expected {rows} rows "
                             f"of {tuple(p.shape)} split as torch.chunk splits dim 0 over {self.world} ranks")
        return local

    def gather_full(self) -> None:
        """Each owner receives every rank's shard of its items' parameters and gradients and joins them into
        the proxies (and their .grad, None where the parameter has none: FSDP2 gives every rank the same None-ness)."""
        for c in self.classes:
            p0 = self.params[c.members[0]]
            rows = self._rows(p0)
            rest = tuple(p0.shape[1:])
            send = torch.zeros((self.world, c.slots, 2, rows, *rest), dtype=p0.dtype,
                               device=self._local(p0, c.members[0]).device)
            has_grad = {i: self.params[i].grad is not None for i in c.members}
            for r in range(self.world):
                for k, i in enumerate(c.owned[r]):
                    p = self.params[i]
                    local = self._local(p, i)
                    send[r, k, 0, :local.shape[0]] = local
                    if has_grad[i]:
                        send[r, k, 1, :local.shape[0]] = self._local(p.grad, i)
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send, group=self.group)
            for k, i in enumerate(c.owned[self.rank]):
                full = recv[:, k].transpose(0, 1).reshape(2, self.world * rows, *rest)[:, :p0.shape[0]]
                proxy = self.proxies[i]
                proxy.copy_(full[0])
                if has_grad[i]:
                    if proxy.grad is None:
                        proxy.grad = torch.empty_like(proxy)
                    proxy.grad.copy_(full[1])
                else:
                    proxy.grad = None

    def scatter_shards(self) -> None:
        """Every rank receives its rows of the parameters the owners updated."""
        for c in self.classes:
            p0 = self.params[c.members[0]]
            rows = self._rows(p0)
            rest = tuple(p0.shape[1:])
            send = torch.zeros((self.world, c.slots, rows, *rest), dtype=p0.dtype,
                               device=self._local(p0, c.members[0]).device)
            for k, i in enumerate(c.owned[self.rank]):
                padded = torch.zeros((self.world * rows, *rest), dtype=p0.dtype, device=send.device)
                padded[:p0.shape[0]] = self.proxies[i]
                send[:, k] = padded.view(self.world, rows, *rest)
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send, group=self.group)
            for r in range(self.world):
                for k, i in enumerate(c.owned[r]):
                    local = self._local(self.params[i], i)
                    local.copy_(recv[r, k, :local.shape[0]])

    # ---------------------------------------------------------------- replicated parameters

    def gather_replicas(self) -> None:
        """Every rank receives the parameters the owners updated (one all_gather per class)."""
        for c in self.classes:
            p0 = self.params[c.members[0]]
            send = torch.zeros((c.slots, *p0.shape), dtype=p0.dtype, device=p0.device)
            mine = c.owned[self.rank]
            if mine:
                torch._foreach_copy_(list(send[:len(mine)].unbind(0)), [self.params[i] for i in mine])
            recv = torch.empty((self.world * c.slots, *p0.shape), dtype=p0.dtype, device=p0.device)
            _all_gather(recv, send, group=self.group)
            others = [(r * c.slots + k, i) for r in range(self.world) if r != self.rank
                      for k, i in enumerate(c.owned[r])]
            if others:
                torch._foreach_copy_([self.params[i] for _, i in others], [recv[j] for j, _ in others])

    # ---------------------------------------------------------------- the step

    def before_step(self) -> None:
        if self.dtensor:
            self.gather_full()

    def after_step(self) -> None:
        if self.dtensor:
            self.scatter_shards()
        else:
            self.gather_replicas()
