"""`CompiledSOAP`: the torch.optim shell around the stacked math.

Per step, on the host: apply edits made to `optimizer.state`, write changed hyperparameters to the device, check
that every parameter and gradient lives in its bucket slot (`residence`: copy in whatever does not), choose the
step graph, run it, copy back out the parameters that do not live in their slots. The graph is `stacked.step`,
compiled once per plan and refresh pattern (`compilation`), or with compile_per="kind" one call per bucket of
`stacked.bucket_step` compiled once per kind (`kinds`); on CUDA with mode="reduce-overhead" it is one CUDA graph
replay either way.

Which buckets refresh is decided on the host from what the host knows exactly: each parameter's refresh clock
counts the calls in which it had a gradient (docs/spec.md §8), so no device value is ever read in steady state.
State is owned by `state.StackedState`.

With torch.distributed, each parameter has one owner rank (`ownership`) that alone keeps its state and steps it;
`sharding.Exchange` brings the owners what they need before the graph and everyone the result after it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from . import stacked
from .checkpoint import FORMAT_VERSION, check_and_convert, extra_state, load_state_dict_with_hooks, \
    merge_state_dicts, saved_entry, state_dict_with_hooks
from .compilation import COMPILE_UNITS, StepCompiler, choose_unit, opaque_to_dynamo
from .hyper_table import HyperTable, copy_from_host
from .hyperparameters import checked_defaults, validate_param_group
from .nvtx_ranges import nvtx_range
from .orthogonalization import ORTHOGONALIZATIONS, full_precision_matmul
from .planning import layout_of
from .ownership import plan_ownership, saved_owners
from .sharding import Exchange, check_same_parameters, decide_group
from .residence import STORAGES, GradientRouter, Residence
from .state import StackedState, StateTable
from .validation import state_dtype, validate_grad

logger = logging.getLogger("compiled_soap")

# Graphs set up ahead at the first compiling call: refresh patterns looked for over at most this many calls, and at
# most this many graphs (the plain one included). Each costs a compile, so a model whose buckets refresh at many
# different calls gets the first few ahead and the rest when they first occur.
PATTERN_HORIZON = 4096
MAX_PREPARED = 8


class CompiledSOAP(torch.optim.Optimizer):
    """SOAP with the whole step compiled into one graph. Same arguments and defaults as `compiled_soap.SOAP`.

    Extra args:
        compile: run the stacked step through torch.compile (False: the same batched functions, eagerly).
        mode: torch.compile mode; "reduce-overhead" captures each step kind as a CUDA graph.
        backend: torch.compile backend; "aot_eager" traces the same graphs without code generation (debugging,
            and the CPU test suite, where Inductor's C++ compilation takes minutes).
        orthogonalization: how the refresh orthonormalises F·Q: "householder" (torch.linalg.qr, the paper's) or
            "cholesky" (shifted CholeskyQR3: batched matmuls only, much faster on GPUs), or
            "householder-outside-graph" (the paper's QR as an op that Inductor keeps out of the CUDA graph: the
            refresh becomes a few graph replays around an eager QR, for a GPU whose QR cannot be captured).
        shard: with torch.distributed, give each parameter one owner rank, which alone keeps its state and runs
            its step; the others receive the updated parameter (docs/distributed.md). None (default): shard when
            torch.distributed is initialised and the group has more than one rank. False: every rank steps every
            parameter it was given (needed under ZeroRedundancyOptimizer, which gives each rank its own subset).
            Parameters may be plain tensors (the same on every rank: DDP) or DTensors sharded on dim 0 (FSDP2).
        process_group: the ProcessGroup or 1-D DeviceMesh to shard over (HSDP: the shard dimension). Default: the
            mesh dimension DTensor parameters are sharded on, else the default group.
        compile_per: "plan": one compiled graph per plan and refresh pattern, every shape a constant, so its
            compile time grows with the number of distinct shapes; on CUDA, one graph replay per step.
            "kind": one compiled function per kind of bucket (dims, factored axes, dtypes, plain or refresh), with
            symbolic sizes: compile time is the same whatever the number of shapes (README, "Compile time"). A
            step is then one call per bucket: a Python loop on the CPU; on CUDA one outer graph of opaque
            operators, captured as one CUDA graph (not yet run on a GPU).
            "auto" (default): per kind where the plan has at least three buckets per kind, on the CPU with
            Inductor; per plan otherwise (`compilation.choose_unit`). `compile_unit` says which the plan uses.
        storage: "bucket" (default): parameters move into their bucket slots and gradients land in theirs, so a
            step copies neither (README: what `p.grad` then is, and what is copied instead). "separate": the
            optimizer never touches a parameter's memory or `p.grad`, and copies both in and out at every step.

    After each `step()`, `last_step_kind` is "init" (only initialisations), "plain", "refresh" or "none";
    `last_step_copies` counts the gradients and parameters it copied into the buckets;
    `compile_seconds` accumulates the wall time of calls that compiled or recorded a graph; `skipped_steps()`
    returns, on the device, how many calls each parameter skipped for a non-finite gradient.

    All parameters must be on one device. Structural options (merge_dims, max_precond_dim, precondition_1d,
    data_format) are frozen per parameter at its first step, like shampoo_beta and precondition_frequency.
    """

    def __init__(
        self,
        params,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float = -1,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        data_format: str = "channels_first",
        correct_bias: bool = True,
        *,
        compile: bool = True,
        mode: Optional[str] = "reduce-overhead",
        backend="inductor",
        orthogonalization: str = "householder",
        shard: Optional[bool] = None,
        process_group=None,
        storage: str = "bucket",
        compile_per: str = "auto",
    ):
        defaults = checked_defaults(locals())
        if orthogonalization not in ORTHOGONALIZATIONS:
            raise ValueError(f"Invalid orthogonalization: {orthogonalization!r} (one of {sorted(ORTHOGONALIZATIONS)})")
        if shard not in (None, True, False):
            raise ValueError(f"Invalid shard: {shard!r} (None, True or False)")
        if storage not in STORAGES:
            raise ValueError(f"Invalid storage: {storage!r} (one of {list(STORAGES)})")
        if compile_per not in COMPILE_UNITS:
            raise ValueError(f"Invalid compile_per: {compile_per!r} (one of {list(COMPILE_UNITS)})")
        if compile_per == "kind" and orthogonalization == "householder-outside-graph":
            raise ValueError("orthogonalization='householder-outside-graph' needs compile_per='plan': per kind, the "
                             "QR would be inside the operator a CUDA graph captures")
        self._options = {"compile": compile, "mode": mode, "backend": backend, "orthogonalization": orthogonalization,
                         "shard": shard, "process_group": process_group, "storage": storage,
                         "compile_per": compile_per}
        self._router = GradientRouter()
        self._residence: Optional[Residence] = None
        self._rank_of: dict = {}  # parameter -> owner rank, once sharding is set up (kept: state never moves)
        self._owner = StackedState()
        self._compiler = StepCompiler(compile, backend, mode)
        self._unit: Optional[str] = None  # what the current plan compiles per ("plan", "kind"): `compile_unit`
        self._params: list = []
        self._hyper: Optional[HyperTable] = None
        self.last_step_kind: Optional[str] = None
        self.last_step_copies = {"gradients": 0, "parameters": 0}
        super().__init__(params, defaults)
        self.state = StateTable()

    @property
    def compile_seconds(self) -> float:
        return self._compiler.compile_seconds

    @property
    def compile_unit(self) -> Optional[str]:
        """What the current plan's steps are compiled per: "plan" or "kind" (compile_per="auto" decides at the
        plan's first compiled step); None before that, and with compile=False."""
        return self._unit

    @property
    def sharded(self) -> bool:
        """Whether this optimizer shards its parameters over ranks (decided at the first step, load or state_dict
        after the param groups change)."""
        return self._exchange is not None

    # ------------------------------------------------------------------ param groups

    def add_param_group(self, param_group: dict) -> None:
        validate_param_group(param_group, self.defaults)
        devices = {p.device for p in param_group["params"]} | {p.device for p in self._params}
        if len(devices) > 1:
            raise ValueError(f"CompiledSOAP needs all parameters on one device, got {sorted(map(str, devices))}")
        super().add_param_group(param_group)
        self._groups_changed()

    def _groups_changed(self) -> None:
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._group_index = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]
        self._index_of = {p: i for i, p in enumerate(self._params)}
        self._hyper = None  # one row per group: reallocated (and the graphs recompiled) at the next step
        self._compiler.reset()
        self._exchange: Optional[Exchange] = None
        self._sharding_ready = False  # set up at the next step, load or state_dict (it may run collectives)
        self._targets = self._params  # what is stepped for each parameter: itself, or (DTensor) a full proxy
        self._owned = list(range(len(self._params)))
        self._moves: dict = {}  # parameter -> times it left its slot
        if self._options["storage"] == "bucket":
            self._router.watch(self._params)
        self._plan_changed()

    def _setup_sharding(self, saved_by: Optional[dict] = None) -> None:
        """Decide who owns which parameter (`sharding`), once per change of the param groups: collective. A
        sharded checkpoint's record (`saved_by`, its "shard" entry) gives the owners when it applies."""
        if self._sharding_ready:
            return
        self._sharding_ready = True
        group = decide_group(self._params, self._options["shard"], self._options["process_group"])
        if group is None:
            return
        check_same_parameters(self._params, group)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        recorded = saved_owners(saved_by, world, len(self._params))
        if recorded is not None:  # ownership depends on history (late param groups): a rank's shard needs its own
            self._rank_of = dict(zip(self._params, recorded))
        owners = plan_ownership(self._params, [self.param_groups[gi] for gi in self._group_index], self._rank_of,
                                world)
        self._rank_of = dict(zip(self._params, owners))
        self._exchange = Exchange(self._params, owners, group)
        self._targets = self._exchange.targets()
        self._owned = [i for i, r in enumerate(owners) if r == rank]
        if self._owner.buckets:  # param groups added mid-run: the buckets now step new proxies
            self._rebuild(self._owner.entries())
        self._plan_changed()

    def _plan_changed(self) -> None:
        buckets = self._owner.buckets
        initialized = self._owner.is_initialized()
        self._uninitialized = [i for i in self._owned if i not in initialized]
        self._plans = tuple(b.plan for b in buckets)
        self._bucket_tensors = tuple(b.tensors for b in buckets)
        self._compiler.unbind()  # per kind, the bound calls hold the old bucket tensors
        self._unit = None  # decided again for the new plan (`_compile_unit`)
        r = self._owner.routes
        own = {id(p) for p in self._params}
        # parameters themselves (not the proxies of DTensor shards), unless they keep leaving their slots
        movable = [id(p) in own and self._moves.get(p, 0) < 2 for p in r.params]
        self._residence = Residence(r.params, r.param_slots, r.grad_slots, movable, self._options["storage"])
        if self._options["storage"] == "bucket":
            self._router.place({p: s for p, s, m in zip(r.params, r.grad_slots, movable) if m})

    def _rebuild(self, entries: dict) -> None:
        """Every bucket anew from per-parameter entries (the one build path), then `state` re-published."""
        plans = self._plans
        self._owner.rebuild(entries, self._targets, self.param_groups, self._group_index)
        self._owner.publish(self.state, self._params)
        self._plan_changed()
        if self._plans != plans:
            self._compiler.reset()

    # ------------------------------------------------------------------ step

    @opaque_to_dynamo  # inside a user's torch.compile: a graph break, then this step as in eager code (issue 28)
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with nvtx_range("step"):
            self._setup_sharding()
            if self._exchange is not None:
                with nvtx_range("gather"):
                    self._exchange.before_step()
            with nvtx_range("prepare"):
                if self.state.edited:
                    self._apply_state_edits()
                if self._hyper is None:
                    device = self._params[0].device if self._params else torch.device("cpu")
                    self._hyper = HyperTable(self.param_groups, self.defaults, device)
                self._hyper.update(self.param_groups)
                has_grad, copies, new = self._intake()
            kind = None
            if has_grad.any():
                grad_slots, grads, param_slots, params = copies
                self.last_step_copies = {"gradients": len(grads), "parameters": len(params)}
                if grads:
                    try:
                        torch._foreach_copy_(grad_slots, grads)
                    except RuntimeError:
                        for p in self._owner.routes.params:  # a sparse or otherwise unusable gradient: say which
                            if p.grad is not None:
                                validate_grad(p)
                        raise
                if params:
                    torch._foreach_copy_(param_slots, params)
                refreshing = self._schedule(has_grad)
                kind = "refresh" if any(refreshing) else "plain"
                # Not while parameters initialise: their buckets are rebuilt right after this call (a new plan).
                if not new and not self._compiler.ready((self._plans, refreshing)):
                    self._prepare_graphs(refreshing)
                self._run_graph(refreshing)
                if params:
                    torch._foreach_copy_(params, param_slots)
                # Parameters in their slots were changed in place behind autograd's back: say so, as an in-place
                # update would, so that a backward through a graph that saw the old values raises.
                _increment_version(self._residence.resident_params)
            else:
                self.last_step_copies = {"gradients": 0, "parameters": 0}
            if new:
                with nvtx_range("initialize"):
                    self._initialize(new)
            if self._exchange is not None:
                with nvtx_range("scatter"):
                    self._exchange.after_step()
                if not self.state.held_elsewhere:  # gradients are alike on every rank: so is this
                    self.state.held_elsewhere = any(p.grad is not None for p in self._params)
        self.last_step_kind = kind or ("init" if new else "none")
        return loss

    def _run_graph(self, refreshing: tuple) -> None:
        kind = "refresh" if any(refreshing) else "plain"
        # The orthogonalisation runs its fp32 matmuls at full precision whatever the user set (CholeskyQR breaks
        # down under TF32); plain steps keep the user's setting, like the reference.
        method = self._options["orthogonalization"]
        describe = lambda: f"{len(refreshing)} buckets" + (  # noqa: E731
            f", {sum(refreshing)} refreshing" if kind == "refresh" else "")
        with full_precision_matmul() if kind == "refresh" else contextlib.nullcontext():
            if self._compile_unit(method) == "kind":
                # The bucket's tensors (the first argument) have the item axis first, never broadcast: a bucket of
                # one parameter runs the artifact of a larger bucket of its kind (docs/design.md §7).
                self._compiler.run_each((self._plans, refreshing), kind, stacked.bucket_step,
                                        lambda: stacked.bucket_calls(self._plans, self._bucket_tensors,
                                                                     self._hyper.hyper, refreshing, method),
                                        batched=1, describe=describe)
            else:
                self._compiler.run((self._plans, refreshing), kind, stacked.step,
                                   {"refreshing": refreshing, "method": method},
                                   self._plans, self._bucket_tensors, self._hyper.hyper, describe=describe)

    def _compile_unit(self, method: str) -> Optional[str]:
        if self._unit is None and self._options["compile"]:
            unit = self._options["compile_per"]
            if unit == "auto":
                if method == "householder-outside-graph":  # its QR must stay outside a captured operator
                    unit = "plan"
                else:
                    plain = (False,) * len(self._plans)
                    kinds = self._compiler.count_kinds(stacked.bucket_step, stacked.bucket_calls(
                        self._plans, self._bucket_tensors, self._hyper.hyper, plain, method), batched=1)
                    unit = choose_unit(len(self._plans), kinds, self._options["backend"], self._params[0].device)
                    logger.info("compile_per='auto': compiling per %s (%d buckets of %d kinds, %s, %s)", unit,
                                len(self._plans), kinds, self._options["backend"], self._params[0].device.type)
            self._unit = unit
        return self._unit

    def _prepare_graphs(self, now: tuple) -> None:
        """Compile (and record) the graphs of the refresh patterns coming up, now, so that the first refresh does
        not stall training halfway through its first epochs (docs/design.md §1).

        Each graph is run with every item's has_grad off: `stacked.step` then leaves every state tensor and
        parameter bit-identical (all its writes are torch.where(active, new, old)), so these calls change nothing.
        This call's pattern `now` is set up the same way and then replays for this call's real step."""
        patterns = ([now] + [r for r in self._upcoming_patterns() if r != now])[:MAX_PREPARED]
        upcoming = [r for r in patterns if not self._compiler.ready((self._plans, r))]
        if not upcoming:
            return
        logger.info("setting up %d step graphs (%d buckets) ahead of the calls that need them", len(upcoming),
                    len(self._plans))
        buckets = self._owner.buckets
        for b in buckets:
            b.tensors.has_grad.zero_()
        try:
            for refreshing in upcoming:
                while not self._compiler.ready((self._plans, refreshing)):
                    self._run_graph(refreshing)
        finally:
            for b in buckets:  # what the host mirror says the device holds (`_schedule` relies on it)
                copy_from_host(b.tensors.has_grad, torch.from_numpy(b.host_has_grad.copy()))

    def _upcoming_patterns(self) -> list:
        """The refreshing tuples of the next calls if every bucketed parameter keeps getting a gradient (the host
        clocks run forward, as `_schedule` advances them), each where it first comes, over one period of all the
        refresh frequencies (at most PATTERN_HORIZON calls) and at most MAX_PREPARED patterns. A pattern met later
        (gradients that come and go) compiles when it first occurs."""
        o = self._owner
        horizon = 1
        for f in np.unique(o.host_frequency).tolist():
            horizon = min(math.lcm(horizon, f), PATTERN_HORIZON)
        patterns = []
        clock = o.host_clock.copy()
        for _ in range(horizon):
            clock += 1
            due = clock % o.host_frequency == 0
            pattern = tuple(bool(x) for x in np.logical_or.reduceat(due, o.bucket_starts))
            if pattern not in patterns:
                patterns.append(pattern)
                if len(patterns) == MAX_PREPARED:
                    break
        return patterns

    def _intake(self):
        """Which parameters have a gradient, and the copies that bring them into the static buffers:
        (has_grad over the bucketed parameters, (grad slots, grads, param slots, params), new parameter indices).

        The hot path of every step: a few list comprehensions over the parameters (about three attribute reads
        each); everything per bucket or per parameter that does not change between steps was built by
        `_plan_changed`."""
        r = self._owner.routes
        params = r.params
        grads = [p.grad for p in params]
        # Storage changes: a new dtype or shape re-plans; a new address or memory format is copied
        # (`Residence.check`).
        if [p.dtype for p in params] != r.dtypes or [p.shape for p in params] != r.shapes:
            self._storage_changed()
            return self._intake()
        moved = self._residence.moved()
        if moved:
            self._left_slot(moved)
            return self._intake()
        missing = [g is None for g in grads]
        has_grad = r.all_true if not any(missing) else ~np.array(missing, dtype=bool)
        copies = self._residence.copies(grads, has_grad)
        new = []
        for i in self._uninitialized:
            p = self._targets[i]
            if p.grad is not None:
                validate_grad(p)
                new.append(i)
        return has_grad, copies, new

    def _storage_changed(self) -> None:
        """Some parameter is not what its bucket was planned for. A new shape raises; a new dtype re-plans the
        parameter with its state carried over (converted, with a warning, when the state dtype changes)."""
        for b in self._owner.buckets:
            for i, p in zip(b.members, b.params):
                plan = b.plan
                if p.shape != plan.layout.shape:
                    raise ValueError(
                        f"parameter {i} changed shape from {plan.layout.shape} to {tuple(p.shape)} after its first "
                        "step, and its SOAP state has the old shape: reset its state (del optimizer.state[p]) or "
                        "build a new optimizer")
                if state_dtype(p.dtype) != plan.state_dtype:
                    warnings.warn(f"parameter {i} changed dtype from {plan.param_dtype} to {p.dtype} after its first "
                                  f"step: its SOAP state was converted from {plan.state_dtype} to "
                                  f"{state_dtype(p.dtype)}")
        self._rebuild(self._owner.entries())

    def _left_slot(self, params: list) -> None:
        """Parameters moved out of their slots (`p.data = ...`, `model.to(...)`): every bucket anew, in fresh
        memory, so that nothing writes the memory they left. One that moves a second time stays where the user
        puts it and is copied in and out."""
        for p in params:
            self._moves[p] = self._moves.get(p, 0) + 1
        self._rebuild(self._owner.entries())

    def _schedule(self, has_grad: np.ndarray) -> tuple:
        """Advance the host clocks by this call's gradients (§8: exactly what the graph does to the device clocks),
        upload which items have a gradient where that changed, and return, per bucket, whether any of its items
        is due for a refresh at this call. `has_grad` is over the bucketed parameters, in bucket order."""
        o = self._owner
        if not np.array_equal(has_grad, o.host_has_grad):
            for b, (start, end) in zip(o.buckets, o.routes.bounds):
                if not np.array_equal(has_grad[start:end], b.host_has_grad):
                    copy_from_host(b.tensors.has_grad, torch.from_numpy(has_grad[start:end].copy()))
            o.host_has_grad[:] = has_grad
        np.add(o.host_clock, has_grad, out=o.host_clock)
        due = has_grad & (o.host_clock % o.host_frequency == 0)
        if not due.any():
            return (False,) * len(o.buckets)
        return tuple(bool(x) for x in np.logical_or.reduceat(due, o.bucket_starts))

    # ------------------------------------------------------------------ first calls and state edits

    def _initialize(self, new: list) -> None:
        """First call of these parameters (§3 I1-I3), eagerly, one at a time; then the buckets are rebuilt."""
        entries = {}
        for i in new:
            p, g = self._targets[i], self.param_groups[self._group_index[i]]
            if not bool(torch.isfinite(p.grad).all()):  # stays uninitialised, like the reference
                self._owner.pre_init_skipped[i] = self._owner.pre_init_skipped.get(i, 0) + 1
                continue
            beta = g["shampoo_beta"] if g["shampoo_beta"] >= 0 else g["betas"][1]
            entries[i] = stacked.initial_entry(p.grad, layout_of(p.shape, g), state_dtype(p.dtype), float(beta),
                                               int(g["precondition_frequency"]))
            entries[i]["skipped"] = self._owner.pre_init_skipped.get(i, 0)  # skips before the first step count too
        if entries:
            self._rebuild({**self._owner.entries(), **entries})
        else:
            self._owner.publish(self.state, self._params)

    def _apply_state_edits(self) -> None:
        """Bring the stacks in line with what was written into `optimizer.state` since the last step."""
        edited, self.state.edited = self.state.edited, set()
        entries = self._owner.entries()
        replaced = {}
        owned = set(self._owned)
        for p in edited:
            if p not in self._index_of:
                raise ValueError("optimizer.state has an entry for a tensor that is not a parameter of this optimizer")
            i = self._index_of[p]
            if i not in owned:  # another rank's parameter (a wrapper writing every entry on every rank)
                continue
            entry = dict.get(self.state, p)
            if entry is not None and "Q" in entry:
                replaced[i] = entry
                continue
            entries.pop(i, None)  # reset: the next gradient initialises it again
            self._owner.pre_init_skipped[i] = int(entry.get("skipped", 0)) if entry else 0
        if replaced:  # checked and converted exactly as a checkpoint of these entries would be
            _, converted = check_and_convert(self, {"state": {i: saved_entry(_host_entry(e)) for i, e in
                                                              replaced.items()},
                                                    "param_groups": self._packed_groups(),
                                                    "format_version": FORMAT_VERSION}, _factor_sizes)
            entries.update({self._index_of[p]: e for p, e in converted.items()})
        self._rebuild(entries)

    # ------------------------------------------------------------------ state_dict, copies

    def owned_parameters(self) -> list:
        """Indices (over the param groups, as in state_dict) of the parameters this rank keeps state for and steps:
        all of them unless sharded. Collective the first time after the param groups change (sets sharding up)."""
        self._setup_sharding()
        return list(self._owned)

    def skipped_steps(self) -> torch.Tensor:
        """Per parameter (param_groups order), calls skipped for a non-finite gradient. A device tensor: reading
        it (`.tolist()`) syncs, keeping it does not."""
        device = self._params[0].device if self._params else torch.device("cpu")
        return self._owner.skipped_steps(len(self._params), device)

    def _state_dict(self) -> dict:
        self._setup_sharding()
        if self.state.edited:
            self._apply_state_edits()
        state = {i: saved_entry(_host_entry(e)) for i, e in self._owner.entries().items()}
        state.update({i: {"skipped": n} for i, n in self._owner.pre_init_skipped.items() if n})
        state = {**dict(sorted(state.items())), **extra_state(self.state)}  # extra: keys that are no parameter's
        out = {"state": state, "param_groups": self._packed_groups(),
               "format_version": FORMAT_VERSION}
        if self._exchange is not None:  # the entries of this rank's parameters only, and who owns the others
            out["shard"] = {"rank": self._exchange.rank, "world_size": self._exchange.world,
                            "owners": list(self._exchange.owners)}
        return out

    def consolidated_state_dict(self) -> dict:
        """Sharded: every rank's entries in one state_dict, returned on every rank (collective; the whole state
        passes through host memory). It loads at any world size, or in one process. Unsharded: `state_dict()`."""
        local = self.state_dict()
        if self._exchange is None:
            return local
        return merge_state_dicts(self._exchange.gather_objects(local))

    def _packed_groups(self) -> list:
        """param_groups as a checkpoint stores them: parameters as their index over all groups."""
        return [{**{k: v for k, v in g.items() if k != "params"}, "params": [self._index_of[p] for p in g["params"]]}
                for g in self.param_groups]

    def state_dict(self) -> dict:
        return state_dict_with_hooks(self, self._state_dict)

    def _load_state_dict(self, state_dict: dict) -> None:
        groups, state = check_and_convert(self, state_dict, _factor_sizes)
        # Everything was checked: from here on nothing can fail half-way.
        self.param_groups = groups
        self._owner = StackedState()
        self._groups_changed()
        self._setup_sharding(state_dict.get("shard"))  # sharded: each rank keeps the entries of what it owns
        self._warn_if_another_ranks_shard(state_dict.get("shard"))
        index, owned = self._index_of, set(self._owned)
        self.state.held_elsewhere = self._exchange is not None and any(index[p] not in owned for p in state)
        state = {index[p]: s for p, s in state.items() if index[p] in owned}
        self._owner.pre_init_skipped = {i: s["skipped"] for i, s in state.items() if "Q" not in s}
        dict.clear(self.state)  # as torch.optim replaces it: keys that are no parameter's come from the checkpoint
        self.state.update(extra_state(state_dict["state"], state_dict["param_groups"]))
        self._rebuild({i: s for i, s in state.items() if "Q" in s})

    def _warn_if_another_ranks_shard(self, saved_by) -> None:
        me = None if self._exchange is None else {"rank": self._exchange.rank, "world_size": self._exchange.world}
        if saved_by is None or {k: saved_by.get(k) for k in ("rank", "world_size")} == me:
            return
        where = "in one process" if me is None else f"on rank {me['rank']} of {me['world_size']}"
        warnings.warn(f"loading {where} the state_dict of rank {saved_by.get('rank')} of {saved_by.get('world_size')}:"
                      " it holds that rank's parameters only, and the parameters it has no entry for start afresh. "
                      "Load consolidated_state_dict() or merge_state_dicts() of every rank's state_dict instead.")

    def load_state_dict(self, state_dict: dict) -> None:
        load_state_dict_with_hooks(self, state_dict, self._load_state_dict)

    def __getstate__(self) -> dict:
        # Compiled functions cannot be copied or pickled: a copy is rebuilt from the checkpoint layout. A deep copy
        # shares the process group; a pickle drops it (the copy shards over the default choice).
        return {"param_groups": self.param_groups, "defaults": self.defaults, "state_dict": self._state_dict(),
                "options": {**self._options, "process_group": _Shared(self._options["process_group"])}}

    def __setstate__(self, state: dict) -> None:
        options = {**state["options"]}
        if isinstance(options["process_group"], _Shared):
            options["process_group"] = options["process_group"].obj
        CompiledSOAP.__init__(self, state["param_groups"], **state["defaults"], **options)
        self._load_state_dict(state["state_dict"])


class _Shared:
    """An object that copies of an optimizer share rather than copy (its process group): deepcopy keeps it,
    pickling drops it."""

    def __init__(self, obj):
        self.obj = obj

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (_Shared, (None,))


def _increment_version(tensors: list) -> None:
    if tensors:
        torch.autograd.graph.increment_version(tensors)


def _factor_sizes(p: torch.Tensor, group: dict) -> list:
    return list(layout_of(p.shape, group).factor_sizes)


def _host_entry(entry: dict) -> dict:
    """An entry with its 0-d device scalars read back as Python numbers (syncs: checkpoints and edits only)."""
    out = dict(entry)
    for key, cast in (("step", int), ("skipped", int), ("refresh_clock", int), ("shampoo_beta", float),
                      ("precondition_frequency", int)):
        if isinstance(out.get(key), torch.Tensor):
            out[key] = cast(out[key])
    return out
