"""`CompiledSOAP`: the Optimizer shell around the stacked math.

It owns the state tensors (stacked per bucket, see `planning`), keeps every hyperparameter and step count on the
device, gathers the gradients into static buffers, and then runs ONE compiled function per step:
`stacked.plain_step` or `stacked.refresh_step`, chosen on the host. On CUDA with mode="reduce-overhead" that call is
one CUDA graph replay; the other work of a steady-state step is a fixed handful of copies (gradients, and
hyperparameters only when a scheduler changed them).

Which step kind to run is decided without reading the device: the host knows each parameter's step count up to
the steps skipped for non-finite gradients (decided on the device). It reads the counts back asynchronously (a
non-blocking copy it only looks at once it has landed) and runs the refresh graph whenever some parameter MAY be
due; inside the graph each parameter refreshes only if its own count says so. A late or skipped parameter is
therefore exact, never early or late; the price of the uncertainty is at most an occasional refresh graph with
nothing due.
"""

from __future__ import annotations

import time
import types
from collections import defaultdict
from typing import Callable, Optional

import numpy as np
import torch

from . import stacked
from .checkpoint import FORMAT_VERSION, check_and_convert
from .nvtx_ranges import nvtx_range
from .planning import BucketPlan, bucket_key, from_merged, layout_of, make_plan, to_merged
from .validation import checked_defaults, validate_grad, validate_param_group


class _Bucket:
    """One bucket's plan, its tensors (as the stacked functions take them) and its parameters."""

    def __init__(self, plan: BucketPlan, tensors: dict, indices: list[int]):
        self.plan, self.tensors, self.indices = plan, tensors, indices
        self.grad_slots = list(tensors["grad"].unbind(0))  # static views the gradients are copied into

    @property
    def params(self) -> list:
        return self.tensors["params"]


class CompiledSOAP(torch.optim.Optimizer):
    """SOAP with the whole step compiled into one graph. Same arguments and defaults as `compiled_soap.SOAP`.

    Extra args:
        compile: run the stacked step through torch.compile (False: the same batched functions, eagerly).
        mode: torch.compile mode; "reduce-overhead" captures each step kind as a CUDA graph.
        backend: torch.compile backend; "aot_eager" traces the same graphs without code generation (debugging,
            and the CPU test suite, where Inductor's C++ compilation takes minutes).

    After each `step()`, `last_step_kind` is "init" (only initialisations), "plain", "refresh" or "none".
    `compile_seconds` accumulates the wall time of calls that compiled or recorded a graph.
    `skipped_steps()` returns, on the device and without a sync, how many steps each parameter skipped for a
    non-finite gradient.

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
        backend: str = "inductor",
    ):
        defaults = checked_defaults(locals())
        self._use_compile = compile
        self._mode = mode if backend == "inductor" else None
        self._backend = backend
        self._buckets: list[_Bucket] = []
        self._items: Optional[dict] = None
        self._initialized: Optional[np.ndarray] = None
        self._plan_version = 0
        self._functions: dict = {}
        self._calls: dict = defaultdict(int)
        self._hyper_cache: Optional[list] = None
        self._has_grad_cache: Optional[np.ndarray] = None
        self._adopt_grads: set = set()
        self.last_step_kind: Optional[str] = None
        self.compile_seconds = 0.0
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ param groups and per-parameter tensors

    def add_param_group(self, param_group: dict) -> None:
        validate_param_group(param_group, self.defaults)
        devices = {p.device for p in param_group["params"]} | {p.device for g in self.param_groups for p in g["params"]}
        if len(devices) > 1:
            raise ValueError(f"CompiledSOAP needs all parameters on one device, got {sorted(map(str, devices))}")
        super().add_param_group(param_group)
        self._resize_items()

    def _resize_items(self) -> None:
        """(Re)build the per-parameter device tensors, keeping the values of parameters seen before."""
        self._params = params = [p for g in self.param_groups for p in g["params"]]
        n, old = len(params), self._items
        device = params[0].device if params else torch.device("cpu")
        items = {
            "step": torch.zeros(n, dtype=torch.int64, device=device),
            "skipped": torch.zeros(n, dtype=torch.int64, device=device),
            "has_grad": torch.zeros(n, dtype=torch.bool, device=device),
            "group": torch.tensor([gi for gi, g in enumerate(self.param_groups) for _ in g["params"]],
                                  dtype=torch.int64, device=device),
            "shampoo_beta": torch.zeros(n, dtype=torch.float64, device=device),
            "frequency": torch.ones(n, dtype=torch.int64, device=device),
            "hyper": torch.zeros(len(self.param_groups), stacked.N_HYPER, dtype=torch.float64, device=device),
        }
        initialized = np.zeros(n, dtype=bool)
        if old is not None:
            m = len(self._initialized)
            for key in ("step", "skipped", "shampoo_beta", "frequency"):
                items[key][:m].copy_(old[key])
            initialized[:m] = self._initialized
            self._host_step = np.pad(self._host_step, (0, n - m))
            self._host_since = np.pad(self._host_since, (0, n - m))
            self._host_frequency = np.pad(self._host_frequency, (0, n - m), constant_values=1)
        else:
            self._host_step = np.zeros(n, dtype=np.int64)
            self._host_since = np.zeros(n, dtype=np.int64)
            self._host_frequency = np.ones(n, dtype=np.int64)
            self._snapshot = None
        self._items, self._initialized = items, initialized
        self._hyper_cache = self._has_grad_cache = None
        self._mark_static(list(items.values()))
        self._plan_changed()

    def _plan_changed(self) -> None:
        self._plan_version += 1
        self._functions.clear()
        # (slot, parameter, index) for every bucketed parameter: what _gather_grads walks at each step.
        self._grad_routes = [r for b in self._buckets for r in zip(b.grad_slots, b.params, b.indices)]
        self._publish_state()

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with nvtx_range("step"):
            with nvtx_range("prepare"):
                params = self._params
                has_grad = np.zeros(len(params), dtype=bool)
                for i, p in enumerate(params):
                    if p.grad is not None:
                        validate_grad(p)
                        has_grad[i] = True
                new = np.flatnonzero(has_grad & ~self._initialized)
                stepping = has_grad & self._initialized
                kind = None
                if stepping.any():
                    self._read_snapshot()
                    kind = "refresh" if self._refresh_possible(stepping) else "plain"
                    self._write_hyperparameters()
                    self._write_has_grad(stepping)
                    self._gather_grads(stepping)
            if kind is not None:
                self._run(kind)
                self._after_run(stepping)
            if len(new):
                with nvtx_range("initialize"):
                    self._initialize([params[i] for i in new], new)
        self.last_step_kind = kind or ("init" if len(new) else "none")
        return loss

    def _run(self, kind: str) -> None:
        fn = self._function(kind)
        plans = tuple(b.plan for b in self._buckets)
        buckets = [b.tensors for b in self._buckets]
        # reduce-overhead: the first call warms up (compiles), the second records the graph, later calls replay.
        key = (kind, self._plan_version)
        setup_calls = 0 if not self._use_compile else (2 if self._mode == "reduce-overhead" else 1)
        if self._calls[key] < setup_calls:
            start = time.perf_counter()
            with nvtx_range(f"compile/{kind}"):
                fn(plans, buckets, self._items)
            self.compile_seconds += time.perf_counter() - start
        else:
            with nvtx_range(f"graph/{kind}"):
                fn(plans, buckets, self._items)
        self._calls[key] += 1

    def _function(self, kind: str):
        if kind not in self._functions:
            fn = stacked.refresh_step if kind == "refresh" else stacked.plain_step
            if self._use_compile:
                # A private copy of the function per optimizer and plan: Dynamo keeps its cache on the code
                # object, so sharing it would make every plan a recompile of one code object (limit 8).
                code = fn.__code__.replace()
                fn = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
                fn = torch.compile(fn, fullgraph=True, dynamic=False, backend=self._backend, mode=self._mode)
            self._functions[kind] = fn
        return self._functions[kind]

    # ------------------------------------------------------------------ host-side preparation

    def _write_hyperparameters(self) -> None:
        rows = []
        for g in self.param_groups:
            lr = g["lr"]
            lr = float(lr.item() if isinstance(lr, torch.Tensor) else lr)
            rows.append((lr, float(g["betas"][0]), float(g["betas"][1]), float(g["eps"]),
                         float(g["weight_decay"]), float(g["correct_bias"]), float(g["normalize_grads"])))
        if rows != self._hyper_cache:
            _copy_from_host(self._items["hyper"], torch.tensor(rows, dtype=torch.float64))
            self._hyper_cache = rows

    def _write_has_grad(self, stepping: np.ndarray) -> None:
        if self._has_grad_cache is None or not np.array_equal(stepping, self._has_grad_cache):
            _copy_from_host(self._items["has_grad"], torch.from_numpy(stepping.copy()))
            self._has_grad_cache = stepping.copy()

    def _gather_grads(self, stepping: np.ndarray) -> None:
        """Bring this step's gradients into the static buffers: one batched copy, of the gradients that are not
        already there. After its first step each parameter's .grad IS a view of its slot; while it is zeroed in
        place (zero_grad(set_to_none=False)) backward accumulates straight into the buffer and nothing is copied.
        With set_to_none=True autograd hands out fresh tensors, which are copied (never stale memory: the address
        is checked every step)."""
        slots, grads = [], []
        for slot, p, i in self._grad_routes:
            if stepping[i] and p.grad.data_ptr() != slot.data_ptr():
                slots.append(slot)
                grads.append(p.grad)
        if slots:
            torch._foreach_copy_(slots, grads)
        if self._adopt_grads:  # parameters restored by load_state_dict: make their .grad the slot from now on
            for slot, p, i in self._grad_routes:
                if stepping[i] and p in self._adopt_grads:
                    _adopt_grad(p, slot)
                    self._adopt_grads.discard(p)

    def _refresh_possible(self, stepping: np.ndarray) -> bool:
        """Could any stepping parameter's new step count be a multiple of its refresh period?

        Its count after this step lies in [known + 1, known + since + 1]: `known` was read from the device, `since`
        counts the steps attempted after that read, each of which may have been skipped.
        """
        lo = self._host_step + 1
        hi = self._host_step + self._host_since + 1
        f = self._host_frequency
        return bool(np.any(stepping & ((hi // f) * f >= lo)))

    def _after_run(self, stepping: np.ndarray) -> None:
        self._host_since += stepping
        if self._snapshot is None:  # at most one read-back in flight
            self._snapshot = (_ReadBack(self._items["step"]), self._host_since.copy())

    def _read_snapshot(self) -> None:
        if self._snapshot is not None and self._snapshot[0].ready():
            read_back, since_at_copy = self._snapshot
            m = len(since_at_copy)  # parameters added since the copy keep their host-side counts
            self._host_step[:m] = read_back.values()
            self._host_since[:m] -= since_at_copy
            self._snapshot = None

    # ------------------------------------------------------------------ initialisation (eager)

    def _initialize(self, params: list[torch.Tensor], indices: np.ndarray) -> None:
        """First call of these parameters (spec §3): factors and eigenbases only; buckets by shape."""
        groups = {p: g for g in self.param_groups for p in g["params"]}
        members: dict[tuple, list] = defaultdict(list)
        for p, i in zip(params, indices):
            if not bool(torch.isfinite(p.grad).all()):
                self._items["skipped"][i] += 1  # stays uninitialised, like the reference
                continue
            members[bucket_key(p, groups[p])].append((p, int(i)))
        if not members:
            self._publish_state()  # the skip counts of parameters that stay uninitialised
            return
        items = self._items
        for key, pairs in members.items():
            plan = make_plan(key, len(pairs))
            ps, idx = [p for p, _ in pairs], [i for _, i in pairs]
            frozen_beta = [_frozen_shampoo_beta(groups[p]) for p in ps]
            frequency = [groups[p]["precondition_frequency"] for p in ps]
            grad = torch.stack([p.grad for p in ps])
            factors, bases = stacked.initialize(plan, grad, torch.tensor(frozen_beta, dtype=torch.float64,
                                                                             device=grad.device))
            zeros = torch.zeros((len(ps), *plan.layout.merged_shape), dtype=plan.state_dtype, device=grad.device)
            self._add_bucket(plan, ps, idx, grad, zeros, zeros.clone(), factors, bases)
            for p, slot in zip(ps, self._buckets[-1].grad_slots):
                _adopt_grad(p, slot)
            index = torch.tensor(idx, device=grad.device)
            items["step"].index_fill_(0, index, 0)
            items["shampoo_beta"].index_copy_(0, index, torch.tensor(frozen_beta, dtype=torch.float64,
                                                                         device=grad.device))
            items["frequency"].index_copy_(0, index, torch.tensor(frequency, device=grad.device))
            self._initialized[idx] = True
            self._host_step[idx] = 0
            self._host_since[idx] = 0
            self._host_frequency[idx] = frequency
        self._plan_changed()

    def _add_bucket(self, plan, params, indices, grad, exp_avg, exp_avg_sq, factors, bases) -> None:
        tensors = {
            "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "factors": factors,
            "eigenbases": bases, "index": torch.tensor(indices, device=grad.device), "params": list(params),
        }
        self._mark_static([grad, exp_avg, exp_avg_sq, tensors["index"], *params,
                           *[t for t in factors + bases if t is not None]])
        self._buckets.append(_Bucket(plan, tensors, list(indices)))

    def _mark_static(self, tensors: list) -> None:
        # Static inputs keep their addresses inside the CUDA graph instead of being copied in at every replay.
        if self._use_compile:
            for t in tensors:
                if t.is_cuda:
                    torch._dynamo.mark_static_address(t, guard=False)

    # ------------------------------------------------------------------ state: views, state_dict

    def _publish_state(self) -> None:
        """`self.state[p]` holds live views of the stacked state, in the reference's layout and keys."""
        self.state = defaultdict(dict)
        items = self._items
        for b in self._buckets:
            exp_avg = from_merged(b.tensors["exp_avg"], b.plan.layout)
            exp_avg_sq = from_merged(b.tensors["exp_avg_sq"], b.plan.layout)
            for j, (p, i) in enumerate(zip(b.params, b.indices)):
                self.state[p] = {
                    "step": items["step"][i], "exp_avg": exp_avg[j], "exp_avg_sq": exp_avg_sq[j],
                    "GG": [None if f is None else f[j] for f in b.tensors["factors"]],
                    "Q": [None if q is None else q[j] for q in b.tensors["eigenbases"]],
                    "precondition_frequency": int(self._host_frequency[i]),
                    "shampoo_beta": items["shampoo_beta"][i],
                    "skipped": items["skipped"][i],
                }
        # Like SOAP, a parameter whose every gradient so far was non-finite has a state holding just its skip count.
        uninitialized = np.flatnonzero(~self._initialized)
        if len(uninitialized):
            counts = items["skipped"][torch.from_numpy(uninitialized).to(items["skipped"].device)].tolist()
            params = self._params
            for i, n in zip(uninitialized.tolist(), counts):
                if n:
                    self.state[params[i]] = {"skipped": items["skipped"][i]}

    def skipped_steps(self) -> torch.Tensor:
        """Per parameter (param_groups order), steps skipped for a non-finite gradient. A device tensor: reading
        it (`.tolist()`) syncs, keeping it does not."""
        return self._items["skipped"]

    def state_dict(self) -> dict:
        index = {p: i for i, p in enumerate(self._params)}
        groups = []
        for g in self.param_groups:
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [index[p] for p in g["params"]]})
        state = {}
        skipped = self._items["skipped"].tolist()
        for p, s in self.state.items():
            if "Q" not in s:  # no optimizer state (only a skip count, or an empty entry made by reading self.state[p])
                continue
            state[index[p]] = {
                "step": int(s["step"]),
                "exp_avg": s["exp_avg"].clone(memory_format=torch.contiguous_format),
                "exp_avg_sq": s["exp_avg_sq"].clone(memory_format=torch.contiguous_format),
                "GG": [None if f is None else f.clone() for f in s["GG"]],
                "Q": [None if q is None else q.clone() for q in s["Q"]],
                "precondition_frequency": s["precondition_frequency"],
                "shampoo_beta": float(s["shampoo_beta"]),
                "skipped": skipped[index[p]],
            }
        for p, i in index.items():
            if i not in state and skipped[i]:
                state[i] = {"skipped": skipped[i]}
        return {"state": state, "param_groups": groups, "format_version": FORMAT_VERSION}

    def load_state_dict(self, state_dict: dict) -> None:
        groups, state = check_and_convert(self, state_dict, lambda p, g: list(layout_of(p.shape, g).factor_sizes))
        # Everything was checked: from here on nothing can fail half-way.
        self.param_groups = groups
        self._buckets, self._items, self._initialized, self._adopt_grads = [], None, None, set()
        self._resize_items()
        params = self._params
        group_of = {p: g for g in groups for p in g["params"]}
        members: dict[tuple, list] = defaultdict(list)
        for i, p in enumerate(params):
            s = state.get(p, {})
            self._items["skipped"][i] = s.get("skipped", 0)
            if "Q" in s:
                members[bucket_key(p, group_of[p])].append((p, i, s))
        for key, triples in members.items():
            plan = make_plan(key, len(triples))
            ps, idx, ss = zip(*triples)
            stack = lambda k: to_merged(torch.stack([s[k] for s in ss]), plan.layout).contiguous()  # noqa: E731
            mats = lambda k: [None if ss[0][k][a] is None else torch.stack([s[k][a] for s in ss])  # noqa: E731
                              for a in range(len(plan.layout.factor_sizes))]
            grad = torch.zeros((len(ps), *ps[0].shape), dtype=ps[0].dtype, device=ps[0].device)
            self._add_bucket(plan, ps, list(idx), grad, stack("exp_avg"), stack("exp_avg_sq"), mats("GG"), mats("Q"))
            for p, i, s in triples:
                self._items["step"][i] = s["step"]
                self._items["shampoo_beta"][i] = s["shampoo_beta"]
                self._items["frequency"][i] = s["precondition_frequency"]
                self._initialized[i] = True
                self._host_step[i] = s["step"]
                self._host_frequency[i] = s["precondition_frequency"]
            self._adopt_grads.update(ps)
        self._plan_changed()


class _ReadBack:
    """A device tensor's values on the host, copied without blocking it: poll ready() before values()."""

    def __init__(self, t: torch.Tensor):
        if t.is_cuda:
            self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._host.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = t.clone(), None

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def values(self) -> np.ndarray:
        return self._host.numpy()


def _frozen_shampoo_beta(group: dict) -> float:
    sb = group["shampoo_beta"]
    return float(sb if sb >= 0 else group["betas"][1])


def _adopt_grad(p: torch.Tensor, slot: torch.Tensor) -> None:
    """Make the gradient buffer's slot (which holds the same values) the parameter's .grad (see _gather_grads)."""
    if p.grad.dtype == p.dtype and p.grad.layout == p.layout:
        p.grad = slot


def _copy_from_host(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Host -> device without blocking the host: through pinned memory, which the caching host allocator keeps
    alive until the copy has run."""
    if dst.is_cuda:
        dst.copy_(src.pin_memory(), non_blocking=True)
    else:
        dst.copy_(src)
