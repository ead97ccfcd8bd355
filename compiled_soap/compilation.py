"""Compilation mechanics: torch.compile per plan and step kind, static addresses, warm-up and recording, NVTX.

Nothing here knows SOAP. A `StepCompiler` hands out one compiled callable per (plan version, kind); on CUDA with
mode="reduce-overhead" each callable is one CUDA graph: the first call compiles and warms up, the second records,
later calls replay (docs/design.md §1). Through `run_each`, a step is instead one call per bucket of its kind's
artifact (`kinds.KindCompiler`, compiled once for every size; docs/design.md §7): a Python loop, or on CUDA one
compiled graph of those calls.
"""

from __future__ import annotations

import functools
import logging
import time
import types
from typing import Callable, Hashable, Optional

import torch
import torch._inductor.config

from .kinds import PER_KIND_INDUCTOR_OPTIONS, KindCompiler, compiled_kinds
from .nvtx_ranges import nvtx_range

logger = logging.getLogger("compiled_soap")

# A setup call (compile, warm-up or CUDA graph recording) longer than this is logged, so a long first step does not
# look like a hang.
SLOW_COMPILE_S = 1.0

# What one compiled function covers: a whole step of one plan (every shape a constant), or one kind of call;
# "auto" chooses per plan (`choose_unit`).
COMPILE_UNITS = ("auto", "plan", "kind")

# compile_per="auto" compiles per kind where a plan has at least this many calls (buckets) per kind.
AUTO_CALLS_PER_KIND = 3


def choose_unit(calls: int, kinds: int, backend, device: torch.device) -> str:
    """compile_per="auto": "kind" where that compiles much faster, by CPU measurements (docs/design.md §7). A
    plan's cold compile grows by about 7 s per call it unrolls, a kind's artifacts cost 14-19 s: from 3 calls per
    kind, compiling per kind saves a quarter or more. Below that it saves little, and its price in steady state
    counts more: kernels of symbolic sizes run a few percent slower than exact-size ones on large tensors (on
    small ones, the host cost it saves more than pays for that). "plan" with other backends, which a user picks
    to inspect or debug the step: they get the one step graph they asked for (aot_eager's compile times trade
    off like Inductor's), and on CUDA, where the per-kind form (one outer graph of operators) has not run on a
    GPU yet."""
    if backend != "inductor" or device.type != "cpu":
        return "plan"
    return "kind" if calls >= AUTO_CALLS_PER_KIND * kinds else "plan"


def mark_static(tensors) -> None:
    """Persistent tensors keep their address inside the CUDA graph instead of being copied in at every replay.
    Marked on every device, so that a trace on CPU shows the same static-input set a CUDA capture gets."""
    for t in tensors:
        if t is not None:
            torch._dynamo.mark_static_address(t, guard=False)


def opaque_to_dynamo(fn: Callable) -> Callable:
    """`fn` runs as plain Python even when a user's torch.compile'd code calls it: Dynamo breaks the user's graph
    around the call instead of tracing into it (README, "Inside your own torch.compile"). A compiled function that
    `fn` calls still compiles and runs as usual: one graph replay on CUDA. For code that drives its own compiled
    callables from host-side bookkeeping, or that Dynamo must not trace (mark_static_address is forbidden to it)."""
    return torch._dynamo.disable(fn)


def _private_copy(fn: Callable) -> Callable:
    # Dynamo keeps its cache on the code object: a private copy per compiled callable keeps every plan and kind
    # from counting towards one code object's recompile limit (8).
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class StepCompiler:
    """Compiled step callables, keyed by what they specialise on.

    compile: False runs the function eagerly (the same batched math, no tracing).
    backend / mode: passed to torch.compile; mode only applies to Inductor. Inductor gets
        emulate_precision_casts, so a 16-bit parameter is rounded exactly where the eager code rounds it.
    `run` compiles one callable per key; `run_each` one artifact per kind of call (`KindCompiler`), shared by
    every key.
    """

    def __init__(self, compile: bool, backend, mode: Optional[str]):
        self.enabled = compile
        self.backend = backend
        self.mode = mode if backend == "inductor" else None
        self.compile_seconds = 0.0
        self._functions: dict = {}
        self._calls: dict = {}
        self._setup: dict = {}  # key -> calls before it replays
        self._bound: set = set()  # keys of `run_each`, whose callables hold the tensors they were bound to
        self._kinds = KindCompiler(backend, PER_KIND_INDUCTOR_OPTIONS)
        # Per kind: call the artifacts through one compiled outer graph (None: on CUDA only, where it is one CUDA
        # graph; True on the CPU for tests of that path).
        self.outer_graph: Optional[bool] = None

    def reset(self) -> None:
        """Forget every compiled callable (the plan changed: shapes or the number of buckets). Per kind, the
        artifacts are kept: a new plan reuses every kind it shares with the old one."""
        self._functions.clear()
        self._calls.clear()
        self._setup.clear()
        self._bound.clear()

    def unbind(self) -> None:
        """The tensors of the calls changed (a rebuild): the bound per-kind calls go; compiled callables that take
        their tensors at each call (`run`) stay."""
        for key in self._bound:
            del self._functions[key], self._calls[key], self._setup[key]
        self._bound.clear()

    def count_kinds(self, fn: Callable, calls: list, batched: int = 0) -> int:
        """How many kinds the `(static_kwargs, args)` of `calls` are of (what `run_each` would compile for them)."""
        return KindCompiler.count_kinds(fn, calls, batched)

    def _build(self, fn: Callable, static_kwargs: dict) -> Callable:
        if not self.enabled:
            return functools.partial(fn, **static_kwargs)
        # Not torch.compile(partial): Dynamo runs every partial through one shared wrapper code object. The
        # private copy is compiled itself and sees one value of the static arguments (a constant to Dynamo).
        compiled = self._compile(_private_copy(fn))
        return lambda *args: compiled(*args, **static_kwargs)

    def _compile(self, fn: Callable) -> Callable:
        if self.backend != "inductor":
            return torch.compile(fn, fullgraph=True, dynamic=False, backend=self.backend)
        options = {"emulate_precision_casts": True}
        if self.mode == "reduce-overhead":
            options["triton.cudagraphs"] = True
            if hasattr(torch._inductor.config, "graph_partition"):
                # An op tagged cudagraph_unsafe (orthogonalization="householder-outside-graph") splits the graph
                # into replays around it instead of turning cudagraphs off for the whole step.
                options["graph_partition"] = True
        elif self.mode not in (None, "default"):
            # torch.compile takes either a mode or options: other modes go without the precision option.
            return torch.compile(fn, fullgraph=True, dynamic=False, mode=self.mode)
        return torch.compile(fn, fullgraph=True, dynamic=False, backend="inductor", options=options)

    def _setup_calls(self, graph: bool = True) -> int:
        """Calls of a callable before it replays: compile (and warm up), then record (reduce-overhead). None for
        the per-kind Python loop: its artifacts were compiled when bound, and its first call is a plain step."""
        if not self.enabled or not graph:
            return 0
        return 2 if self.mode == "reduce-overhead" else 1

    def ready(self, key: Hashable) -> bool:
        """Whether the callable for `key` has been compiled (and recorded), so that its next call replays."""
        return self._calls.get(key, 0) >= self._setup.get(key, self._setup_calls())

    def run(self, key: Hashable, name: str, fn: Callable, static_kwargs: dict, *args,
            describe: Callable[[], str] = str) -> None:
        """Call the compiled `fn(*args, **static_kwargs)` for `key`, under an NVTX range `compile/name` while it
        compiles or records and `graph/name` once it replays. `describe()` says what the graph holds in the log line
        of a slow setup call (called only then: replays stay free of it)."""
        if key not in self._functions:
            self._functions[key] = self._build(fn, static_kwargs)
            self._calls[key], self._setup[key] = 0, self._setup_calls()
        self._invoke(key, name, args, describe)

    def run_each(self, key: Hashable, name: str, fn: Callable, calls: Callable[[], list], batched: int = 0,
                 describe: Callable[[], str] = str) -> None:
        """Per kind: `fn(*args, **static_kwargs)` for each `(static_kwargs, args)` of `calls()`, in order, each
        through its kind's artifact (compiled when its kind is first met). `calls()` is asked once per `key`; its
        tensors are bound until `unbind`. On the CPU the artifacts are called from a Python loop; on CUDA (or with
        `outer_graph`) each is an opaque operator and the loop one compiled graph, so that mode="reduce-overhead"
        captures every kernel of every bucket in one CUDA graph. `batched`: the first arguments of each call hold a
        batch axis (`KindCompiler`: a batch of one may share a larger batch's artifact). NVTX ranges and log lines
        as in `run`."""
        if key not in self._functions:
            start, known = time.perf_counter(), compiled_kinds()
            with nvtx_range(f"compile/{name}"):
                bound = self._kinds.bind_all(fn, calls(), batched)
            outer = self.outer_graph if self.outer_graph is not None else any(
                t.is_cuda for _, tensors in bound for t in tensors)
            if outer:
                ops = tuple(artifact.op() for artifact, _ in bound)
                tensors = tuple(tuple(t) for _, t in bound)
                compiled = self._build(_call_each, {"ops": ops})
                self._functions[key] = lambda: compiled(tensors)
            else:
                runs = [functools.partial(artifact.run, *tensors) for artifact, tensors in bound]
                self._functions[key] = functools.partial(_run_each, runs)
            self._calls[key], self._setup[key] = 0, self._setup_calls(outer)
            self._bound.add(key)
            seconds = time.perf_counter() - start
            self.compile_seconds += seconds
            if seconds > SLOW_COMPILE_S:
                detail = describe()
                logger.warning("compiling %d kinds of bucket for the %s step%s took %.1f s; this optimizer uses %d "
                               "compiled kinds in all", compiled_kinds() - known, name,
                               f" ({detail})" if detail else "", seconds, self._kinds.kinds)
        self._invoke(key, name, (), describe)

    def _invoke(self, key: Hashable, name: str, args: tuple, describe: Callable[[], str]) -> None:
        compiled = self._functions[key]
        if self._calls[key] < self._setup[key]:
            start = time.perf_counter()
            with nvtx_range(f"compile/{name}"):
                compiled(*args)
            seconds = time.perf_counter() - start
            self.compile_seconds += seconds
            if seconds > SLOW_COMPILE_S:
                action = "compiling" if self._calls[key] == 0 else "recording"
                detail = describe()
                logger.warning("%s the %s step graph%s took %.1f s; later calls replay it", action, name,
                               f" ({detail})" if detail else "", seconds)
        else:
            with nvtx_range(f"graph/{name}"):
                compiled(*args)
        self._calls[key] += 1


def _run_each(runs: list) -> None:
    for run in runs:
        run()


def _call_each(tensors: tuple, ops: tuple) -> None:
    """The outer graph of a per-kind step: one opaque operator call per bucket (compiled with `ops` static)."""
    for op, args in zip(ops, tensors):
        op(*args)
