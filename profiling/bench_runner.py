"""Drive one optimizer on fixed gradients: build it, warm it up, time its steady-state steps, profile a window.

Kept apart from bench.py so the measurement rules live in one short place:
  * gradients are assigned (p.grad = g, the same fixed tensors every step) before the timer starts: only
    optimizer.step() is timed;
  * CPU: time.perf_counter around step(); CUDA: a pair of CUDA events around step(), read after the repeat, so the
    host may run ahead as in training and a step costs what it adds to the GPU timeline;
  * a step's kind (init/plain/refresh) comes from CompiledSOAP's `last_step_kind`, else from the schedule (call 1
    initialises, refreshes at calls f+1, 2f+1, ...); a disagreement is counted, not hidden.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time

import torch

from compiled_soap.hyperparameters import DEFAULTS
from compiled_soap.orthogonalization import ORTHOGONALIZATIONS as _METHODS

from .presets import Preset, make_params

OPTIMIZERS = ("adamw", "soap-reference", "soap-batched-eager", "compiled-soap", "compiled-soap-per-plan",
              "compiled-soap-per-kind")
# compiled-soap is CompiledSOAP's default (compile_per="auto"); the per-plan and per-kind rows force one unit.
DEFAULT_OPTIMIZERS = OPTIMIZERS[:4]
COMPILE_UNIT = {"compiled-soap-per-plan": "plan", "compiled-soap-per-kind": "kind"}
# Which FLOP model applies (flop_model.py); None = no matmul work counted.
FLOP_VARIANT = {"adamw": None, "soap-reference": "reference", "soap-batched-eager": "batched",
                "compiled-soap": "batched", "compiled-soap-per-plan": "batched", "compiled-soap-per-kind": "batched"}
# Same hyperparameters everywhere (SOAP's defaults, read from the library), so only the implementation differs.
HYPER = {name: DEFAULTS[name] for name in ("lr", "betas", "eps", "weight_decay")}
# CompiledSOAP's orthogonalization options ("householder", "cholesky", "householder-outside-graph"). The reference
# SOAP has the first two; "householder-outside-graph" is Householder QR kept out of the CUDA graph, which for the
# eager reference is plain "householder".
ORTHOGONALIZATIONS = tuple(_METHODS)


def reference_orthogonalization(method: str) -> str:
    """The reference SOAP's option for CompiledSOAP's `method` (same math; the reference has no graph)."""
    return "householder" if method == "householder-outside-graph" else method


class Unavailable(Exception):
    """The optimizer cannot be built in this checkout/environment; the row is reported as skipped."""


def build_optimizer(name: str, params, device: torch.device, period: int, backend: str = "inductor",
                    orthogonalization: str = "householder"):
    if orthogonalization not in ORTHOGONALIZATIONS:
        raise ValueError(f"unknown orthogonalization {orthogonalization!r}; choose from {ORTHOGONALIZATIONS}")
    if name == "adamw":
        return torch.optim.AdamW(params, **HYPER, fused=device.type == "cuda")
    import compiled_soap

    if name == "soap-reference":
        return compiled_soap.SOAP(params, **HYPER, precondition_frequency=period,
                                  orthogonalization=reference_orthogonalization(orthogonalization))
    cls = getattr(compiled_soap, "CompiledSOAP", None)
    if cls is None:
        raise Unavailable("compiled_soap.CompiledSOAP does not exist in this checkout")
    if name == "soap-batched-eager":
        return cls(params, **HYPER, precondition_frequency=period, compile=False,
                   orthogonalization=orthogonalization)
    unit = {"compile_per": COMPILE_UNIT[name]} if name in COMPILE_UNIT else {}
    return cls(params, **HYPER, precondition_frequency=period, compile=True, backend=backend,
               orthogonalization=orthogonalization, **unit)


def schedule_kind(call: int, period: int, has_refresh: bool) -> str:
    if call == 1:
        return "init"
    if has_refresh and (call - 1) % period == 0:
        return "refresh"
    return "plain"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def annotate(name: str, nvtx_on: bool = False):
    """record_function for torch.profiler, plus an NVTX range in domain "bench" when profiling under nsys."""
    with torch.profiler.record_function(name):
        if nvtx_on:
            import nvtx

            nvtx.push_range(name, domain="bench")
            try:
                yield
            finally:
                nvtx.pop_range(domain="bench")
        else:
            yield


class Runner:
    def __init__(self, name: str, preset: Preset, grads: list, device: torch.device, period: int, seed: int = 0,
                 backend: str = "inductor", orthogonalization: str = "householder"):
        self.name, self.device, self.period = name, device, period
        self.has_refresh = FLOP_VARIANT[name] is not None
        self.params = make_params(preset, device, seed)
        self.grads = grads
        # Everything alive before the optimizer exists (params, grads, other rows' leftovers): peak_bytes is
        # measured above this line.
        self.baseline_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        self.opt = build_optimizer(name, self.params, device, period, backend, orthogonalization)
        self.calls = 0
        self.kind_mismatches = 0

    def load_grads(self) -> None:
        for p, g in zip(self.params, self.grads):
            p.grad = g

    def step(self) -> str:
        """One optimizer.step(); returns the kind of step that ran. Grads must already be loaded."""
        expected = schedule_kind(self.calls + 1, self.period, self.has_refresh)
        self.opt.step()
        self.calls += 1
        kind = getattr(self.opt, "last_step_kind", None) or expected
        if kind != expected:
            self.kind_mismatches += 1
        return kind

    def annotated_step(self, nvtx_on: bool = False) -> str:
        self.load_grads()
        expected = schedule_kind(self.calls + 1, self.period, self.has_refresh)
        with annotate(f"{self.name}/step/{expected}", nvtx_on):
            return self.step()

    # -------------------------------------------------------------- phases

    def warm_up(self, calls: int) -> dict:
        """The init call plus `calls` more: compile, graph recording, library initialisation all land here."""
        sync(self.device)
        t0 = time.perf_counter()
        self.load_grads()
        self.step()
        sync(self.device)
        init_s = time.perf_counter() - t0
        kinds: dict[str, int] = {}
        for _ in range(calls):
            self.load_grads()
            k = self.step()
            kinds[k] = kinds.get(k, 0) + 1
        sync(self.device)
        return {"init_s": init_s, "total_s": time.perf_counter() - t0, "kinds": kinds}

    def time_steps(self, steps: int) -> list[tuple[str, float]]:
        """(kind, ms) per step for `steps` consecutive steps."""
        out = []
        if self.device.type == "cuda":
            pending = []
            for _ in range(steps):
                self.load_grads()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                k = self.step()
                end.record()
                pending.append((k, start, end))
            torch.cuda.synchronize(self.device)
            out = [(k, s.elapsed_time(e)) for k, s, e in pending]
        else:
            for _ in range(steps):
                self.load_grads()
                t0 = time.perf_counter()
                k = self.step()
                out.append((k, (time.perf_counter() - t0) * 1e3))
        return out

    def profile_cycle(self) -> list[dict]:
        """torch.profiler over one refresh period (CUDA): per-kind launches, graph replays, kernels, kernel time."""
        from .summarize import read_torch_trace, summarize

        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        sync(self.device)
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(self.period):
                self.annotated_step()
            sync(self.device)
        fd, path = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        try:
            prof.export_chrome_trace(path)
            with open(path) as f:
                return summarize(read_torch_trace(json.load(f)), match=f"{self.name}/step/")
        finally:
            os.unlink(path)

    def state_bytes(self) -> int:
        """Bytes of unique storages reachable from the optimizer (opt.state, and attributes: a batched optimizer may
        keep stacked buffers outside opt.state), excluding parameters and gradients."""
        seen = {t.untyped_storage().data_ptr() for t in [*self.params, *self.grads]}
        total = 0

        def visit(x, depth):
            nonlocal total
            if depth > 6:
                return
            if isinstance(x, torch.Tensor):
                st = x.untyped_storage()
                if st.data_ptr() not in seen and st.nbytes():
                    seen.add(st.data_ptr())
                    total += st.nbytes()
            elif isinstance(x, dict):
                for v in x.values():
                    visit(v, depth + 1)
            elif isinstance(x, (list, tuple)):
                for v in x:
                    visit(v, depth + 1)
            elif type(x).__module__.startswith("compiled_soap") and hasattr(x, "__dict__"):
                visit(vars(x), depth + 1)  # the package's own helper objects (buckets, ...)

        visit(self.opt.state, 0)
        visit({k: v for k, v in vars(self.opt).items() if k not in ("state", "param_groups", "defaults")}, 0)
        return total
