"""Compilation mechanics: torch.compile per plan and step kind, static addresses, warm-up and recording, NVTX.

Nothing here knows SOAP. A `StepCompiler` hands out one compiled callable per (plan version, kind); on CUDA with
mode="reduce-overhead" each callable is one CUDA graph: the first call compiles and warms up, the second records,
later calls replay (docs/design.md §1).
"""

from __future__ import annotations

import functools
import logging
import time
import types
from typing import Callable, Hashable, Optional

import torch
import torch._inductor.config

from .nvtx_ranges import nvtx_range

logger = logging.getLogger("compiled_soap")

# A setup call (compile, warm-up or CUDA graph recording) longer than this is logged, so a long first step does not
# look like a hang.
SLOW_COMPILE_S = 1.0


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
    """

    def __init__(self, compile: bool, backend, mode: Optional[str]):
        self.enabled = compile
        self.backend = backend
        self.mode = mode if backend == "inductor" else None
        self.compile_seconds = 0.0
        self._functions: dict = {}
        self._calls: dict = {}

    def reset(self) -> None:
        """Forget every compiled callable (the plan changed: shapes or the number of buckets)."""
        self._functions.clear()
        self._calls.clear()

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

    @property
    def setup_calls(self) -> int:
        """Calls of a callable before it replays: compile (and warm up), then record (reduce-overhead)."""
        if not self.enabled:
            return 0
        return 2 if self.mode == "reduce-overhead" else 1

    def ready(self, key: Hashable) -> bool:
        """Whether the callable for `key` has been compiled (and recorded), so that its next call replays."""
        return self._calls.get(key, 0) >= self.setup_calls

    def run(self, key: Hashable, name: str, fn: Callable, static_kwargs: dict, *args,
            describe: Callable[[], str] = str) -> None:
        """Call the compiled `fn(*args, **static_kwargs)` for `key`, under an NVTX range `compile/name` while it
        compiles or records and `graph/name` once it replays. `describe()` says what the graph holds in the log line
        of a slow setup call (called only then: replays stay free of it)."""
        if key not in self._functions:
            self._functions[key] = self._build(fn, static_kwargs)
            self._calls[key] = 0
        compiled = self._functions[key]
        if self._calls[key] < self.setup_calls:
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
