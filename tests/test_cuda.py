"""Tests that need a CUDA GPU (skipped without one): equivalence on the GPU, one graph replay per step whatever the
model size, no host sync in steady state, no cudagraph skip. profiling/gpu_session.sh runs them on a lent GPU."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import relative_deviation
from compiled_soap import SOAP, CompiledSOAP

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cuda_model(n_layers, d=64, seed=0):
    # Square matrices: full-rank factors from the first (integer) gradient on, so that batched and per-matrix
    # cuSOLVER eigh (different algorithms on CUDA) agree up to column signs (spec trap 7).
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(d,), (d,)] + [s for _ in range(n_layers) for s in [(d, d), (d,), (d, d), (d, d), (d,)]]
    return [torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen) * 0.1) for s in shapes]


def _cuda_grads(params, step):
    gen = torch.Generator(device="cuda").manual_seed(1000 + step)
    for p in params:
        if step == 0:
            p.grad = torch.randint(-3, 4, p.shape, device="cuda", generator=gen).float()
        else:
            p.grad = torch.randn(p.shape, device="cuda", generator=gen)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("compile_per", ["plan", "kind"])
def test_cuda_matches_reference_fp32(compile_per):
    """compile_per="kind": every artifact an operator inside one reduce-overhead graph, captured as one CUDA
    graph (docs/design.md §7); cudagraph_or_error turns any skip into an error."""
    import torch._inductor.config as inductor_config

    counters.clear()
    a, b = _cuda_model(2), _cuda_model(2)
    start = [p.detach().clone() for p in a]
    ref = SOAP(a, precondition_frequency=3)
    with inductor_config.patch({"triton.cudagraph_or_error": True}):
        fast = CompiledSOAP(b, precondition_frequency=3, compile_per=compile_per)
        for t in range(10):
            _cuda_grads(a, t)
            _cuda_grads(b, t)
            ref.step()
            fast.step()
    assert relative_deviation(a, b, start) < 1e-4
    assert counters["inductor"]["cudagraph_skips"] == 0


def _count_launches(opt, params, steps, first_step):
    from torch.profiler import ProfilerActivity, profile

    for t in range(first_step, first_step + 4):  # warm-up: compile, record, replay
        _cuda_grads(params, t)
        opt.step()
    torch.cuda.synchronize()
    grads = []
    for t in range(steps):
        _cuda_grads(params, first_step + 10 + t)
        grads.append([p.grad for p in params])
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = gi
            opt.step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    graph_launches = sum(n.startswith("cudaGraphLaunch") for n in names)
    other = sum(n.startswith(("cudaLaunchKernel", "cuLaunchKernel", "cudaMemcpyAsync")) for n in names)
    return graph_launches / steps, other / steps


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("compile_per", ["plan", "kind"])
def test_cuda_one_graph_replay_per_step_independent_of_model_size(compile_per):
    per_size = {}
    for layers in (2, 6):
        params = _cuda_model(layers)
        # f large: every measured step is a plain step.
        opt = CompiledSOAP(params, precondition_frequency=1000, compile_per=compile_per)
        _cuda_grads(params, 0)
        opt.step()
        per_size[layers] = _count_launches(opt, params, steps=5, first_step=1)
    for layers, (graphs, other) in per_size.items():
        assert graphs == 1, per_size
        assert other <= 5, per_size
    assert per_size[2][1] == per_size[6][1]


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("compile_per", ["plan", "kind"])
def test_cuda_no_host_sync_in_steady_state(compile_per):
    params = _cuda_model(2)
    opt = CompiledSOAP(params, precondition_frequency=4, compile_per=compile_per)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.99**s)
    for t in range(12):  # warm up both graphs
        _cuda_grads(params, t)
        opt.step()
        sched.step()
    torch.cuda.synchronize()
    grads = []
    for t in range(12, 22):
        _cuda_grads(params, t)
        grads.append([p.grad for p in params])
    torch.cuda.set_sync_debug_mode("error")
    try:
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = gi
            opt.step()
            sched.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in params)


