"""The owner of CompiledSOAP's per-parameter state: stacked device tensors, their host mirror, and `optimizer.state`.

Every initialised parameter's state lives in exactly one bucket (`planning`), stacked with the other members. The
host mirrors what it needs to schedule without reading the device: each bucket's refresh clocks and periods (§8),
which only change by rules the host applies itself.

One build path: buckets are always (re)built from scratch out of per-parameter entries in the checkpoint layout
(`checkpoint.py`), whether the entries come from a first call (`stacked.initial_entry`), a checkpoint, an edit of
`optimizer.state`, a parameter whose dtype changed, or the current buckets themselves (a late parameter joining).
The stacks have one canonical layout (contiguous; eigenbases column-major, see `column_major`), so a resumed run
computes with the same layouts as an uninterrupted one.

`optimizer.state[p]` holds live views of the stacks, in the reference's keys. A `StateTable` notes every assignment
or deletion made through it, and the owner applies them before the next step: replacing a tensor copies it in,
deleting or emptying an entry resets the parameter (its next gradient initialises it again).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import NamedTuple

import numpy as np
import torch

from .compilation import mark_static
from .planning import BucketPlan, bucket_key, from_merged, make_plan, to_merged
from .residence import dense_strides
from .stacked import BucketTensors


class ParamState(dict):
    """One parameter's entry in `optimizer.state`; tells its table when it is changed."""

    def __init__(self, table: "StateTable", key, *args):
        super().__init__(*args)
        self._table, self._key = table, key

    def _edited(self):
        self._table.edited.add(self._key)

    def __setitem__(self, k, v):
        super().__setitem__(k, v)
        self._edited()

    def __delitem__(self, k):
        super().__delitem__(k)
        self._edited()

    def __reduce_ex__(self, protocol):  # a copy of an entry is a plain dict
        return (dict, (dict(self),))

    def _mutator(name):  # noqa: N805
        def method(self, *args, **kwargs):
            result = getattr(dict, name)(self, *args, **kwargs)
            self._edited()
            return result
        return method

    clear, pop, popitem, setdefault, update, __ior__ = map(_mutator, ("clear", "pop", "popitem", "setdefault",
                                                                      "update", "__ior__"))
    del _mutator


class StateTable(defaultdict):
    """`optimizer.state`: a defaultdict of `ParamState` that records which keys were assigned, deleted or edited."""

    def __init__(self, *args):
        super().__init__(None, *args)
        self.edited: set = set()
        # Sharded: other ranks hold state although this one may hold none. Truthiness then answers "has the
        # optimizer state?" for all ranks alike: torch.distributed.checkpoint runs a step to create state when
        # `optimizer.state` is falsy, and a rank stepping alone would wait forever in the step's collectives.
        self.held_elsewhere = False

    def __bool__(self):
        return self.held_elsewhere or dict.__len__(self) > 0

    def __missing__(self, key):
        entry = ParamState(self, key)
        dict.__setitem__(self, key, entry)
        return entry

    def __setitem__(self, key, value):
        if not isinstance(key, torch.Tensor):  # not a parameter's: kept as it is, as torch.optim keeps it
            dict.__setitem__(self, key, value)
            return
        dict.__setitem__(self, key, ParamState(self, key, value))
        self.edited.add(key)

    def __delitem__(self, key):
        dict.__delitem__(self, key)
        if isinstance(key, torch.Tensor):
            self.edited.add(key)

    def clear_parameters(self) -> None:
        """Drop every parameter's entry (not an edit), keeping the keys that are no parameter's."""
        for key in [k for k in self if isinstance(k, torch.Tensor)]:
            dict.__delitem__(self, key)

    def __reduce_ex__(self, protocol):
        return (dict, (dict(self),))

    def publish(self, key, entry: dict) -> None:
        """Set an entry on behalf of the owner: not an edit."""
        dict.__setitem__(self, key, ParamState(self, key, entry))

    # Every other mutator goes through the two above, so no edit goes unnoticed.
    def clear(self):
        for key in list(self):
            del self[key]

    def pop(self, key, *default):
        if key in self:
            value = dict.__getitem__(self, key)
            del self[key]
            return value
        if default:
            return default[0]
        raise KeyError(key)

    def popitem(self):
        key = next(reversed(self.keys()))
        return key, self.pop(key)

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = {} if default is None else default
        return dict.__getitem__(self, key)

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value


class Bucket(NamedTuple):
    plan: BucketPlan
    tensors: BucketTensors
    members: list  # parameter indices (param_groups order), one per stacked item
    params: list  # the parameters themselves
    param_slots: list  # tensors.params.unbind(0)
    grad_slots: list  # tensors.grads.unbind(0)
    host_clock: np.ndarray  # [B] int64, mirrors tensors.refresh_clock exactly (a view of StackedState.host_clock)
    host_frequency: np.ndarray  # [B] int64 (a view of StackedState.host_frequency)
    host_has_grad: np.ndarray  # [B] bool, what tensors.has_grad holds now (a view of StackedState.host_has_grad)


class Routes(NamedTuple):
    """The bucketed parameters in bucket order, with what the hot path compares and copies (built per plan)."""

    params: list
    dtypes: list
    shapes: list
    grad_slots: list
    param_slots: list
    bounds: list  # per bucket, (start, end) in `params`
    all_true: np.ndarray  # all True, one per bucketed parameter

    @staticmethod
    def of(buckets) -> "Routes":
        params = [p for b in buckets for p in b.params]
        ends = np.cumsum([len(b.params) for b in buckets]).tolist()
        return Routes(params, [b.plan.param_dtype for b in buckets for _ in b.params],
                       [torch.Size(b.plan.layout.shape) for b in buckets for _ in b.params],
                       [s for b in buckets for s in b.grad_slots], [s for b in buckets for s in b.param_slots],
                       list(zip([0] + ends[:-1], ends)), np.ones(len(params), dtype=bool))


def column_major(q):
    """[B, d, d] with each matrix column-major: the layout eigh and QR produce, so the eigenbases of a fresh run, a
    resumed run and the reference all enter the same matmul kernels (a different layout rounds differently, and
    a rank-deficient factor's null-space directions are decided by that rounding: docs/spec.md trap 7)."""
    return None if q is None else q.transpose(1, 2).contiguous().transpose(1, 2)


def _vector(values, dtype, device) -> torch.Tensor:
    """[B] tensor from Python numbers or 0-d tensors (views of older stacks: stacked on the device, no sync)."""
    if all(isinstance(v, torch.Tensor) for v in values):
        return torch.stack([v.to(device=device, dtype=dtype) for v in values])
    return torch.tensor([float(v) if dtype.is_floating_point else int(v) for v in values], dtype=dtype, device=device)


def _slot_allocator(n: int, members: list, dtype: torch.dtype, device):
    """[B, *shape] zeros whose items have the members' memory layout when they all share one dense layout
    (channels_last, permuted), so a parameter can live in its slot without changing its strides."""
    shape = tuple(members[0].shape)
    strides = {dense_strides(p) for p in members}
    item = strides.pop() if len(strides) == 1 else None
    numel = math.prod(shape)
    if item is None or any(s == 0 for s in shape):
        return lambda: torch.zeros((n, *shape), dtype=dtype, device=device)
    return lambda: torch.empty_strided((n, *shape), (numel, *item), dtype=dtype, device=device).zero_()


class StackedState:
    """Buckets of stacked state for the parameters of one optimizer, and their host mirror."""

    def __init__(self):
        self.buckets: list[Bucket] = []
        self.pre_init_skipped: dict = {}  # index -> skips of a parameter that was never initialised
        self._mirror([])

    def _mirror(self, buckets: list) -> list:
        """One host array per mirrored quantity over all buckets (bucket order), each bucket holding views: the
        per-step schedule is then a handful of array operations whatever the number of buckets."""
        def joined(field, dtype):
            return np.concatenate([getattr(b, field) for b in buckets]) if buckets else np.zeros(0, dtype=dtype)

        self.host_clock = joined("host_clock", np.int64)
        self.host_frequency = joined("host_frequency", np.int64)
        self.host_has_grad = joined("host_has_grad", bool)
        self.routes = Routes.of(buckets)
        self.bucket_starts = np.array([a for a, _ in self.routes.bounds], dtype=np.int64)
        return [b._replace(host_clock=self.host_clock[a:e], host_frequency=self.host_frequency[a:e],
                           host_has_grad=self.host_has_grad[a:e]) for b, (a, e) in zip(buckets, self.routes.bounds)]

    def is_initialized(self) -> set:
        return {i for b in self.buckets for i in b.members}

    def entries(self) -> dict:
        """Per initialised parameter index, its entry in the checkpoint layout, as views of the stacks."""
        out = {}
        for b in self.buckets:
            t, layout = b.tensors, b.plan.layout
            exp_avg, exp_avg_sq = from_merged(t.exp_avg, layout), from_merged(t.exp_avg_sq, layout)
            for j, i in enumerate(b.members):
                out[i] = {
                    "step": t.step[j], "exp_avg": exp_avg[j], "exp_avg_sq": exp_avg_sq[j],
                    "GG": [None if f is None else f[j] for f in t.factors],
                    "Q": [None if q is None else q[j] for q in t.eigenbases],
                    "precondition_frequency": int(b.host_frequency[j]), "shampoo_beta": t.shampoo_beta[j],
                    "skipped": t.skipped[j], "refresh_clock": t.refresh_clock[j],
                }
        return out

    def rebuild(self, entries: dict, params: list, groups: list, group_index: list) -> None:
        """Form every bucket anew from `entries` ({parameter index: entry}), in parameter order."""
        members: dict = defaultdict(list)
        for i in sorted(entries):
            e = entries[i]
            key = bucket_key(params[i], groups[group_index[i]], int(e["precondition_frequency"]),
                             int(e["refresh_clock"]))
            members[key].append(i)
        buckets = []
        for key, idx in members.items():
            buckets.append(self._stack(make_plan(key, len(idx)), idx, [entries[i] for i in idx], params,
                                       group_index))
        self.buckets = self._mirror(buckets)
        for i in entries:
            self.pre_init_skipped.pop(i, None)

    @staticmethod
    def _stack(plan: BucketPlan, idx: list, es: list, params: list, group_index: list) -> Bucket:
        layout, sdtype = plan.layout, plan.state_dtype
        device = params[idx[0]].device
        n = len(idx)

        def stack(key):  # state tensors in the state dtype (converts when a parameter's dtype changed)
            return to_merged(torch.stack([e[key].to(device=device, dtype=sdtype) for e in es]), layout).contiguous()

        def mats(key):
            out = tuple(None if es[0][key][a] is None else
                        torch.stack([e[key][a].to(device=device, dtype=sdtype) for e in es]).contiguous()
                        for a in range(len(layout.factor_sizes)))
            return tuple(map(column_major, out)) if key == "Q" else out

        frequency = np.array([int(e["precondition_frequency"]) for e in es], dtype=np.int64)
        clock = np.array([int(e["refresh_clock"]) for e in es], dtype=np.int64)
        slots = _slot_allocator(n, [params[i] for i in idx], plan.param_dtype, device)
        tensors = BucketTensors(
            params=slots(), grads=slots(),
            has_grad=torch.zeros(n, dtype=torch.bool, device=device),
            exp_avg=stack("exp_avg"), exp_avg_sq=stack("exp_avg_sq"), factors=mats("GG"), eigenbases=mats("Q"),
            step=_vector([e["step"] for e in es], torch.int64, device),
            refresh_clock=torch.tensor(clock, device=device),  # a copy: the host mirror is separate
            skipped=_vector([e["skipped"] for e in es], torch.int64, device),
            frequency=torch.tensor(frequency, device=device),
            shampoo_beta=_vector([e["shampoo_beta"] for e in es], torch.float64, device),
            group=torch.tensor([group_index[i] for i in idx], dtype=torch.int64, device=device),
        )
        mark_static(torch.utils._pytree.tree_leaves(tensors))
        return Bucket(plan, tensors, list(idx), [params[i] for i in idx], list(tensors.params.unbind(0)),
                      list(tensors.grads.unbind(0)), clock, frequency, np.zeros(n, dtype=bool))

    def publish(self, table: StateTable, params: list) -> None:
        """Fill `table` (optimizer.state) with views of the stacks; parameters without state get no entry, or just
        their skip count (like SOAP)."""
        table.clear_parameters()
        table.edited.clear()
        for i, e in self.entries().items():
            table.publish(params[i], e)
        for i, n in self.pre_init_skipped.items():
            if n:
                table.publish(params[i], {"skipped": n})

    def skipped_steps(self, n_params: int, device) -> torch.Tensor:
        out = torch.zeros(n_params, dtype=torch.int64, device=device)
        for i, n in self.pre_init_skipped.items():
            out[i] = n
        for b in self.buckets:
            out.index_copy_(0, torch.tensor(b.members, device=device), b.tensors.skipped)
        return out
