"""Checkpoints: bitwise resume at every point of the refresh period (each variant against itself, uninterrupted),
cross-loading between SOAP and CompiledSOAP, and the paper's layout.

The expected result of a resumed run is the uninterrupted run of the same optimizer: resume must change nothing,
not even rounding (one canonical memory layout for all state, docs/spec.md §9).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from conftest import INDUCTOR, VARIANTS, full_rank_grads, make_params, relative_deviation
from compiled_soap import SOAP

SHAPES = [(6, 4), (5,), (3, 4, 2), (), (9, 9), (6, 4, 3, 3)]
F = 3


def _groups(params):
    return [{"params": params[:2]}, {"params": params[2:], "lr": 1e-2}]


def _run_with_resumes(factory, resume_points, calls=2 * F + 6, dtype=torch.float32, shapes=SHAPES):
    """Train `calls` calls; at each call in `resume_points`, save (torch.save), and later continue from each
    checkpoint in a NEW optimizer and NEW parameters loaded from it. Returns (uninterrupted params and optimizer,
    {resume point: (resumed params, optimizer)}): one uninterrupted run serves every point."""
    stream = [full_rank_grads(make_params(shapes, dtype), t) for t in range(calls)]
    params = make_params(shapes, dtype)
    opt = factory(_groups(params), precondition_frequency=F)
    saved = {}
    for t, grads in enumerate(stream):
        if t in resume_points:
            buf = io.BytesIO()
            torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
            saved[t] = buf
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    resumed_runs = {}
    for t, buf in saved.items():
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=False)
        resumed = [torch.nn.Parameter(x.clone()) for x in ckpt["params"]]
        opt2 = factory(_groups(resumed), precondition_frequency=F)
        opt2.load_state_dict(ckpt["opt"])
        for grads in stream[t:]:
            for p, g in zip(resumed, grads):
                p.grad = g.clone()
            opt2.step()
        resumed_runs[t] = (resumed, opt2)
    return (params, opt), resumed_runs


@pytest.mark.parametrize("name", list(VARIANTS))
def test_bitwise_resume_at_every_point_of_the_period(name):
    points = range(F + 1, 2 * F + 2)  # every phase of the period, around a refresh
    (a, opt_a), resumed = _run_with_resumes(VARIANTS[name], points)
    assert sorted(resumed) == list(points)
    sa = opt_a.state_dict()["state"]
    for resume_at, (b, opt_b) in resumed.items():
        for x, y in zip(a, b):
            assert torch.equal(x, y), resume_at
        sb = opt_b.state_dict()["state"]
        assert sa.keys() == sb.keys()
        for k in sa:
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(sa[k][key], sb[k][key]), (resume_at, k, key)
            for key in ("GG", "Q"):
                assert all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
                           for x, y in zip(sa[k][key], sb[k][key])), (resume_at, k, key)
            for key in ("step", "refresh_clock", "skipped", "precondition_frequency", "shampoo_beta"):
                assert sa[k][key] == sb[k][key], (resume_at, k, key)


@pytest.mark.compile
def test_bitwise_resume_inductor():
    (a, _), resumed = _run_with_resumes(INDUCTOR, [F + 2], calls=F + 5, shapes=[(9, 9), (5,), (6, 4, 3, 3)])
    b, _ = resumed[F + 2]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("direction", ["reference->compiled", "compiled->reference"])
def test_cross_load_with_reference(direction):
    """A checkpoint of one class continues in the other as the first would have continued (fp64 rounding)."""
    dtype = torch.float64
    stream = [full_rank_grads(make_params(SHAPES, dtype), t) for t in range(14)]
    first, second = (SOAP, VARIANTS["stacked-eager"])
    if direction == "compiled->reference":
        first, second = second, first
    params = make_params(SHAPES, dtype)
    opt = first(params, precondition_frequency=F)
    for grads in stream[:6]:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    ckpt = copy.deepcopy(opt.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = second(resumed, precondition_frequency=F)
    other.load_state_dict(ckpt)
    start = [p.detach().clone() for p in params]
    for grads in stream[6:]:
        for ps in (params, resumed):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        opt.step()
        other.step()
    assert relative_deviation(params, resumed, start) < 1e-10


@pytest.mark.parametrize("name", list(VARIANTS))
def test_checkpoint_uses_the_papers_layout(name):
    """Absent factors are saved as [] (the paper's soap.py iterates them with len()), every entry has the keys the
    paper reads, and a torch.optim loader (the paper's) restores it."""
    params = make_params([(4, 3), (5,), (20, 3)])
    opt = VARIANTS[name](params, precondition_frequency=2, max_precond_dim=6)
    for t in range(3):
        for p, g in zip(params, full_rank_grads(params, t)):
            p.grad = g
        opt.step()
    sd = opt.state_dict()
    assert sd["format_version"] == 2
    assert sd["state"][1]["GG"] == [[]] and sd["state"][1]["Q"] == [[]]
    assert sd["state"][2]["GG"][0] == [] and isinstance(sd["state"][2]["GG"][1], torch.Tensor)
    for entry in sd["state"].values():
        assert {"step", "exp_avg", "exp_avg_sq", "GG", "Q", "precondition_frequency", "shampoo_beta"} <= entry.keys()
        assert isinstance(entry["step"], int) and entry["refresh_clock"] == entry["step"]
    plain = torch.optim.SGD([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.1)
    torch.optim.Optimizer.load_state_dict(plain, {"state": sd["state"], "param_groups": [
        {**plain.param_groups[0], "params": [0, 1, 2]}]})
    assert list(plain.state.values())[1]["GG"] == [[]]
