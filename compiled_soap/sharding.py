"""Sharding over ranks: the process group, and the collectives that move parameters (and, for FSDP2, gradients)
between their owners (`ownership`) and every other rank.

The collectives run directly around the compiled step, not inside it (docs/distributed.md §2 says why): the graph
stays exactly the single-process graph of the rank's own buckets. Per dtype, one collective per direction (see
`Exchange`): an all_gather of the owners' updated parameters when they are replicated (DDP); for DTensor parameters
sharded on dim 0 (FSDP2), an all_to_all gathering each owner's full parameters and gradients into "proxies" the
shell steps in their place, and one returning every rank its rows of the update.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from .validation import is_dtensor

# all_gather_into_tensor was renamed all_gather_single (torch 2.13); torch 2.11 has only the old name
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# ------------------------------------------------------------------------------------------------------ groups


def decide_group(params: list, shard: Optional[bool], process_group):
    """The process group to shard over, or None for no sharding (CompiledSOAP's `shard` argument). Local."""
    dtensor = any(is_dtensor(p) for p in params)
    if shard is None:  # DTensor parameters are only ever stepped sharded, whatever the group's size
        shard = dtensor or (dist.is_available() and dist.is_initialized() and
                            dist.get_world_size(shard_group(params, process_group)) > 1)
    if not shard:
        if dtensor:
            raise ValueError("CompiledSOAP(shard=False) cannot step DTensor parameters: leave shard at its default "
                             "(or True) under FSDP2")
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("CompiledSOAP(shard=True) needs torch.distributed initialised")
    return shard_group(params, process_group)


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
        unequal = (gathered != sums) & ~(gathered.isnan() & sums.isnan())  # a NaN weight is equal to itself here
        differ = unequal.any(0).nonzero().flatten().tolist()
        if differ:
            raise ValueError(f"CompiledSOAP(shard=True): parameters {differ} differ between the ranks of its process "
                             f"group; sharding steps replicated parameters (DDP). {advice}")


# ------------------------------------------------------------------------------------------------------ exchange


class _ReplicaPlan(NamedTuple):
    """One dtype's all_gather: my parameters packed into `send`; everybody's arrive in `recv`."""

    send: torch.Tensor
    recv: torch.Tensor
    mine: list  # indices of the parameters this rank owns, in the order they are packed
    send_views: list  # their places in `send`
    theirs: list  # indices of the other ranks' parameters
    recv_views: list  # their places in `recv`


class _AllToAll(NamedTuple):
    recv: torch.Tensor
    send: torch.Tensor
    recv_split: list
    send_split: list


class _ShardPlan(NamedTuple):
    """One dtype's two all_to_alls (DTensor parameters), with every view the copies around them use."""

    mine: list  # indices of the parameters this rank owns
    gather: _AllToAll  # before the step: rows of parameters and gradients to their owners
    send_items: list  # per piece sent, its parameter index
    send_param_views: list  # where my rows of each go in gather.send
    send_grad_views: list  # ... and my rows of its gradient
    full_views: list  # flat ranges of the proxies and gradient buffers ...
    piece_views: list  # ... and the pieces of gather.recv that fill them
    scatter: _AllToAll  # after the step: rows of the updated proxies back to every rank
    proxy_rows: list  # ranges of my proxies, per destination ...
    out_send_views: list  # ... and their places in scatter.send
    out_items: list  # per piece received, its parameter index
    out_recv_views: list  # its place in scatter.recv


class Exchange:
    """The collectives that move parameters (and, for DTensors, gradients) between owners and everyone else.

    One collective per dtype and direction, over flat buffers allocated once (every view into them is built here;
    a step only copies and communicates):
    - replicated: each rank packs its own parameters, padded to the largest rank's total, and one all_gather
      gives every rank everybody's;
    - DTensor: all_to_all_single with exact split sizes (no padding): rank r sends owner o, for each of o's
      parameters in order, its rows of the parameter and of the gradient; the owner writes the W pieces of each
      into the full proxy (dim-0 chunks, so each piece is one contiguous range of the flat tensor). After the
      step the same in reverse: the owner sends every rank its rows of the updated proxy.
    """

    def __init__(self, params: list, owners: list, group):
        self.group, self.rank, self.world = group, dist.get_rank(group), dist.get_world_size(group)
        self.params, self.owners = params, owners
        self.dtensor = bool(params) and is_dtensor(params[0])
        if any(is_dtensor(p) != self.dtensor for p in params):
            raise ValueError("CompiledSOAP cannot mix DTensor and plain tensor parameters in one optimizer")
        self.shapes, self.dtypes = [p.shape for p in params], [p.dtype for p in params]
        by_dtype: dict = defaultdict(list)
        for i, p in enumerate(params):
            by_dtype[p.dtype].append(i)
        self.proxies: dict = {}  # DTensor mode: index -> full plain tensor standing for the parameter
        self.grad_buffers: dict = {}  # and its full gradient (the proxy's .grad when the parameter has one)
        if self.dtensor:
            for i, p in enumerate(params):
                if p.device_mesh.size(_shard_dim(p)) != self.world:
                    raise ValueError(f"parameter {i} is sharded over {p.device_mesh.size(_shard_dim(p))} ranks, "
                                     f"the optimizer's process group has {self.world}")
                if owners[i] == self.rank:
                    self.proxies[i] = torch.empty(p.shape, dtype=p.dtype, device=p.to_local().device)
                    self.grad_buffers[i] = torch.zeros_like(self.proxies[i])
            self.plans = [self._dtensor_plan(idx) for idx in by_dtype.values()]
        else:
            self.plans = [self._replica_plan(idx) for idx in by_dtype.values()]

    def targets(self) -> list:
        """What the shell steps for each parameter: the parameter itself, or (DTensor) its full proxy."""
        return [self.proxies.get(i) for i in range(len(self.params))] if self.dtensor else list(self.params)

    def check_unchanged(self) -> None:
        """Every rank sees every parameter, so every rank raises alike (a rank-local check could leave the others
        waiting in a collective)."""
        if [p.shape for p in self.params] != self.shapes or [p.dtype for p in self.params] != self.dtypes:
            changed = [i for i, p in enumerate(self.params) if (p.shape, p.dtype) != (self.shapes[i], self.dtypes[i])]
            raise ValueError(f"parameters {changed} changed shape or dtype after sharding was set up; a sharded "
                             "CompiledSOAP keeps both fixed: build a new optimizer (or load its state_dict into one)")

    # ---------------------------------------------------------------- replicated parameters

    def _replica_plan(self, idx: list) -> _ReplicaPlan:
        p0 = self.params[idx[0]]
        mine = [i for i in idx if self.owners[i] == self.rank]
        totals = [sum(self.params[i].numel() for i in idx if self.owners[i] == r) for r in range(self.world)]
        width = max(totals)
        send = torch.zeros(width, dtype=p0.dtype, device=p0.device)
        recv = torch.empty(self.world * width, dtype=p0.dtype, device=p0.device)
        views, theirs, offsets = [], [], [0] * self.world
        for i in idx:
            r, n = self.owners[i], self.params[i].numel()
            if r == self.rank:
                views.append(send[offsets[r]:offsets[r] + n].view(self.params[i].shape))
            else:
                theirs.append((i, recv[r * width + offsets[r]:r * width + offsets[r] + n].view(self.params[i].shape)))
            offsets[r] += n
        return _ReplicaPlan(send, recv, mine, views, [i for i, _ in theirs], [v for _, v in theirs])

    def gather_replicas(self) -> None:
        """Every rank receives the parameters the owners updated."""
        for plan in self.plans:
            if plan.mine:
                torch._foreach_copy_(plan.send_views, [self.params[i] for i in plan.mine])
            _all_gather(plan.recv, plan.send, group=self.group)
            if plan.theirs:
                torch._foreach_copy_([self.params[i] for i in plan.theirs], plan.recv_views)

    # ---------------------------------------------------------------- DTensor parameters

    def _rows(self, i: int, rank: int) -> int:
        """Rows of parameter i on `rank`: dim 0 split as torch.chunk splits it (FSDP2's Shard(0))."""
        d0 = self.shapes[i][0] if len(self.shapes[i]) else 1
        per = -(-d0 // self.world)
        return min(per, max(0, d0 - rank * per))

    def _row_size(self, i: int) -> int:
        return math.prod(self.shapes[i][1:])

    def _local(self, t, i: int) -> torch.Tensor:
        local = t.to_local()
        rows = self._rows(i, self.rank)
        if local.shape[0] != rows or tuple(local.shape[1:]) != tuple(self.shapes[i][1:]):
            raise ValueError(f"parameter {i}: its local shard has shape {tuple(local.shape)}, expected {rows} rows "
                             f"of {tuple(self.shapes[i])} (dim 0 split as torch.chunk splits it over {self.world})")
        return local

    def _dtensor_plan(self, idx: list) -> _ShardPlan:
        """Flat buffers and their views for one dtype. In: [to rank 0 | to rank 1 | ...], each holding, for the
        destination's parameters in order, (my rows of the parameter, my rows of the gradient). Out: [to rank 0 |
        ...], each holding, for my parameters in order, the destination's rows of the updated proxy."""
        p0 = self.params[idx[0]]
        device, dtype = p0.to_local().device, p0.dtype
        owned = [[i for i in idx if self.owners[i] == r] for r in range(self.world)]
        mine = owned[self.rank]
        size = {(i, r): self._rows(i, r) * self._row_size(i) for i in idx for r in range(self.world)}
        # (start, length) of rank r's rows inside the flat parameter i
        start = {(i, r): sum(size[i, k] for k in range(r)) for i in idx for r in range(self.world)}

        in_send_split = [2 * sum(size[i, self.rank] for i in owned[o]) for o in range(self.world)]
        in_recv_split = [2 * sum(size[i, j] for i in mine) for j in range(self.world)]
        in_send = torch.zeros(sum(in_send_split), dtype=dtype, device=device)
        in_recv = torch.empty(sum(in_recv_split), dtype=dtype, device=device)
        send_items, send_param_views, send_grad_views, at = [], [], [], 0
        for o in range(self.world):
            for i in owned[o]:
                n = size[i, self.rank]
                send_items.append(i)
                send_param_views.append(in_send[at:at + n])
                send_grad_views.append(in_send[at + n:at + 2 * n])
                at += 2 * n
        full_views, piece_views, at = [], [], 0
        for j in range(self.world):
            for i in mine:
                n, b = size[i, j], start[i, j]
                flat, grad = self.proxies[i].view(-1), self.grad_buffers[i].view(-1)
                full_views += [flat[b:b + n], grad[b:b + n]]
                piece_views += [in_recv[at:at + n], in_recv[at + n:at + 2 * n]]
                at += 2 * n

        out_send_split = [sum(size[i, j] for i in mine) for j in range(self.world)]
        out_recv_split = [sum(size[i, self.rank] for i in owned[o]) for o in range(self.world)]
        out_send = torch.empty(sum(out_send_split), dtype=dtype, device=device)
        out_recv = torch.empty(sum(out_recv_split), dtype=dtype, device=device)
        proxy_rows, out_send_views, at = [], [], 0
        for j in range(self.world):
            for i in mine:
                n, b = size[i, j], start[i, j]
                proxy_rows.append(self.proxies[i].view(-1)[b:b + n])
                out_send_views.append(out_send[at:at + n])
                at += n
        out_items, out_recv_views, at = [], [], 0
        for o in range(self.world):
            for i in owned[o]:
                n = size[i, self.rank]
                out_items.append(i)
                out_recv_views.append(out_recv[at:at + n])
                at += n
        return _ShardPlan(mine, _AllToAll(in_recv, in_send, in_recv_split, in_send_split), send_items,
                          send_param_views, send_grad_views, full_views, piece_views,
                          _AllToAll(out_recv, out_send, out_recv_split, out_send_split), proxy_rows, out_send_views,
                          out_items, out_recv_views)

    def gather_full(self) -> None:
        """Each owner receives every rank's rows of its parameters and gradients, joined into the proxies (a
        proxy's .grad is None where the parameter has none: FSDP2 gives every rank the same None-ness)."""
        for plan in self.plans:
            items = plan.send_items
            params = [self._local(self.params[i], i).reshape(-1) for i in items]
            torch._foreach_copy_(plan.send_param_views, params)
            with_grad = [k for k, i in enumerate(items) if self.params[i].grad is not None]
            without_grad = [k for k, i in enumerate(items) if self.params[i].grad is None]
            if with_grad:
                torch._foreach_copy_([plan.send_grad_views[k] for k in with_grad],
                                     [self._local(self.params[items[k]].grad, items[k]).reshape(-1)
                                      for k in with_grad])
            if without_grad:
                torch._foreach_zero_([plan.send_grad_views[k] for k in without_grad])
            dist.all_to_all_single(*plan.gather, group=self.group)
            if plan.full_views:
                torch._foreach_copy_(plan.full_views, plan.piece_views)
            for i in plan.mine:
                self.proxies[i].grad = None if self.params[i].grad is None else self.grad_buffers[i]

    def scatter_shards(self) -> None:
        """Every rank receives its rows of the parameters the owners updated."""
        for plan in self.plans:
            if plan.proxy_rows:
                torch._foreach_copy_(plan.out_send_views, plan.proxy_rows)
            dist.all_to_all_single(*plan.scatter, group=self.group)
            if plan.out_items:
                torch._foreach_copy_([self._local(self.params[i], i).view(-1) for i in plan.out_items],
                                     plan.out_recv_views)

    def gather_objects(self, state_dict: dict) -> list:
        """Every rank's `state_dict` (tensors moved to the CPU first), on every rank."""
        on_cpu = torch.utils._pytree.tree_map(lambda x: x.cpu() if isinstance(x, torch.Tensor) else x, state_dict)
        out = [None] * self.world
        dist.all_gather_object(out, on_cpu, group=self.group)
        return out

    # ---------------------------------------------------------------- the step

    def before_step(self) -> None:
        self.check_unchanged()
        if self.dtensor:
            self.gather_full()

    def after_step(self) -> None:
        if self.dtensor:
            self.scatter_shards()
        else:
            self.gather_replicas()
