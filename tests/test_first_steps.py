"""The first steps: every step graph a run needs is set up at its first compiling call, not at the first refresh
(no stall mid-training), and setting them up ahead changes nothing: the run stays bitwise what the uncompiled step
computes. A slow setup says so; a second process compiles from Inductor's cache.

Compilations are counted by a backend of our own (what torch.compile hands a backend is one graph to compile), and
setup calls by the NVTX ranges the step opens (`compile/...` while a graph compiles or records, `graph/...` once it
replays)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

import compiled_soap.compilation as compilation
from compiled_soap import CompiledSOAP
from conftest import bitwise_equal, full_rank_grads, make_params
from spawning import SUBPROCESS_TIMEOUT_S

SHAPES = [(6, 4), (6, 4), (5,), (3, 2, 2), (7, 3)]
LATE_SHAPES = [(4, 4), (2, 9)]


class CountingBackend:
    """A torch.compile backend that runs the traced graph as is and remembers at which optimizer call it compiled."""

    def __init__(self):
        self.call = 0
        self.compiled_at: list[int] = []

    def __call__(self, gm, example_inputs):
        self.compiled_at.append(self.call)
        return gm.forward


def _grads(params, call):
    # The fourth parameter misses its gradient at call 1 (the first compiling call): its refresh clock falls behind
    # its bucket's, which moves its refreshes (docs/spec.md §8).
    out = full_rank_grads(params, call)
    if call == 1:
        out[3] = None
    return out


def _run(make_opt, calls=40, late_at=6, on_call=lambda call: None):
    params = make_params(SHAPES)
    late = make_params(LATE_SHAPES, seed=1)
    opt = make_opt([{"params": params[:3], "precondition_frequency": 2},
                    {"params": params[3:], "precondition_frequency": 4}])
    kinds = []
    for call in range(calls):
        on_call(call)
        if call == late_at:  # a param group added mid-run: a new plan, so new graphs
            opt.add_param_group({"params": late, "precondition_frequency": 4})
        everything = params + (late if call >= late_at else [])
        for p, g in zip(everything, _grads(everything, call)):
            p.grad = None if g is None else g.clone()
        opt.step()
        kinds.append(opt.last_step_kind)
    return params + late, kinds


def test_no_graph_compiled_after_the_first_compiling_call_of_a_plan():
    backend = CountingBackend()

    def on_call(call):
        backend.call = call

    compiled, kinds = _run(lambda groups: CompiledSOAP(groups, backend=backend), on_call=on_call)
    eager, eager_kinds = _run(lambda groups: CompiledSOAP(groups, compile=False))
    # Call 0 initialises; call 1 is the first plain step of the first plan. Call 6 adds a group: the old buckets
    # step once under a new hyperparameter table (one graph, the call's own: the buckets are rebuilt right after)
    # while the new parameters initialise, and call 7 is the first step of the new plan. Several refresh patterns
    # occur later (f=2 and 4, the lagging parameter, the late group's phase), and none compiles when it comes.
    assert kinds.count("refresh") >= 10
    assert backend.compiled_at.count(6) == 1
    assert set(backend.compiled_at) == {1, 6, 7}
    assert backend.compiled_at.count(1) >= 3 and backend.compiled_at.count(7) >= 4  # plain and refresh graphs
    assert kinds == eager_kinds
    assert bitwise_equal(compiled, eager)


def test_setup_calls_happen_before_they_are_needed_with_cuda_graph_recording(monkeypatch):
    # mode="reduce-overhead" takes two setup calls per graph (warm-up, then record). Inductor itself is replaced by
    # the eager function, so this checks only when the graphs are set up, in seconds.
    monkeypatch.setattr(compilation.StepCompiler, "_compile", lambda self, fn: fn)
    ranges = []

    class Recorder:
        def __init__(self, name):
            ranges.append((call_of[0], name))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    call_of = [0]
    monkeypatch.setattr(compilation, "nvtx_range", Recorder)

    def on_call(call):
        call_of[0] = call

    _, kinds = _run(lambda groups: CompiledSOAP(groups, mode="reduce-overhead"), on_call=on_call)
    setup = [(c, n) for c, n in ranges if n.startswith("compile/")]
    assert {c for c, _ in setup} == {1, 6, 7}
    first_refresh = kinds.index("refresh")
    assert first_refresh > 1
    assert [n for c, n in ranges if c == first_refresh] == ["graph/refresh"]
    # Every graph was called twice before its first replay.
    for call in (1, 7):
        names = [n for c, n in setup if c == call]
        assert names.count("compile/plain") == 2 and names.count("compile/refresh") % 2 == 0


def test_slow_setup_is_logged(monkeypatch, caplog):
    monkeypatch.setattr(compilation, "SLOW_COMPILE_S", 0.0)
    params = make_params([(6, 4), (5,)])
    opt = CompiledSOAP(params, precondition_frequency=2, backend=CountingBackend())
    with caplog.at_level(logging.INFO, logger="compiled_soap"):
        for call in range(4):
            for p, g in zip(params, full_rank_grads(params, call)):
                p.grad = g
            opt.step()
    messages = [r.getMessage() for r in caplog.records if r.name == "compiled_soap"]
    assert any(m.startswith("setting up 2 step graphs (2 buckets)") for m in messages), messages
    slow = [m for m in messages if "later calls replay it" in m]
    assert len(slow) == 2, messages  # once per graph, not per call
    assert any(m.startswith("compiling the plain step graph (2 buckets) took") for m in slow)
    assert any(m.startswith("compiling the refresh step graph (2 buckets, 2 refreshing) took") for m in slow)


@pytest.mark.parametrize("frequencies", [(3, 4), (1,), (7, 7, 2)])
def test_upcoming_patterns_are_the_ones_that_occur(frequencies):
    """Against a brute-force schedule: each refresh pattern the run meets (every parameter with a gradient at every
    call) is among those set up ahead, while there are at most MAX_PREPARED of them."""
    import compiled_soap.compiled as compiled_module

    backend = CountingBackend()
    params = make_params([(3, 2 + i) for i in range(len(frequencies))])
    opt = CompiledSOAP([{"params": [p], "precondition_frequency": f} for p, f in zip(params, frequencies)],
                       backend=backend)
    for call in range(60):
        backend.call = call
        for p, g in zip(params, full_rank_grads(params, call)):
            p.grad = g
        opt.step()
    # Parameter i refreshes at the calls k >= 1 where k % f_i == 0 (call 0 initialises, §8).
    patterns = {tuple(k % f == 0 for f in frequencies) for k in range(1, 60)}
    assert len(patterns) <= compiled_module.MAX_PREPARED
    assert len(backend.compiled_at) == len(patterns)
    assert set(backend.compiled_at) == {1}


_CACHE_RUN = """
import json, os, sys, torch
from torch._dynamo.utils import counters
from compiled_soap import CompiledSOAP
torch.set_num_threads(1)
artifacts = sys.argv[1]
if os.path.exists(artifacts):  # shipped from another machine's cache
    torch.compiler.load_cache_artifacts(open(artifacts, "rb").read())
params = [torch.nn.Parameter(torch.ones(s)) for s in [(3, 2), (4,)]]
opt = CompiledSOAP(params, precondition_frequency=2, mode=None)
for call in range(4):
    for i, p in enumerate(params):
        p.grad = torch.full(p.shape, 0.5 + i + call)
    opt.step()
if not os.path.exists(artifacts):
    saved = torch.compiler.save_cache_artifacts()
    open(artifacts, "wb").write(saved[0])
print("COUNTERS " + json.dumps({k: dict(v) for k, v in counters.items() if k in ("inductor", "aot_autograd")}))
"""


def test_a_second_process_compiles_from_the_cache(tmp_path):
    """Warm starts: nothing in the cache keys may change between runs (addresses, ids, time). Two processes on one
    TORCHINDUCTOR_CACHE_DIR: the second finds both graphs (plain, refresh) in the FX graph cache and compiles none.
    A third, on an empty cache directory, loads what the first saved with torch.compiler.save_cache_artifacts (the
    README's way to ship a cache) and compiles none either. Inductor, one tiny model (two shapes)."""
    artifacts = str(tmp_path / "artifacts.bin")
    runs = []
    for cache in ("cache", "cache", "elsewhere"):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / cache), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-c", _CACHE_RUN, artifacts], env=env, capture_output=True,
                              text=True, timeout=SUBPROCESS_TIMEOUT_S)
        assert proc.returncode == 0, proc.stderr[-4000:]
        line = [x for x in proc.stdout.splitlines() if x.startswith("COUNTERS ")][-1]
        runs.append(json.loads(line[len("COUNTERS "):])["inductor"])
    cold, warm, shipped = runs
    assert cold.get("fxgraph_cache_miss") == 2 and not cold.get("fxgraph_cache_hit"), cold
    assert warm.get("fxgraph_cache_hit") == 2 and not warm.get("fxgraph_cache_miss"), warm
    assert shipped.get("fxgraph_cache_hit") == 2 and not shipped.get("fxgraph_cache_miss"), shipped
