"""Gradients the user owns and parameters whose storage changes mid-training (GPU-step issue, findings 2, 3, 7).

Whatever the user does to a parameter's memory or gradient between steps, CompiledSOAP sees exactly what SOAP sees:
a gradient it did not see autograd create is copied in and never taken over, a parameter that left its slot is
read where it now lives (test_residence.py checks what stays in the slots).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import VARIANTS, full_rank_grads, relative_deviation
from compiled_soap import SOAP, CompiledSOAP

COMPILED = [n for n in VARIANTS if n != "soap"]


class _ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 2)
        self.head = torch.nn.Linear(6, 5)


def _train(factory, steps, change=None, at=4, zero="none"):
    """Gradients as a training loop leaves them: with zero="in-place" the same .grad tensors are refilled in
    place (as backward accumulates after zero_grad(set_to_none=False)), with "none" new ones every step. They
    are full rank (docs/spec.md trap 7), so SOAP and CompiledSOAP agree to rounding."""
    torch.manual_seed(0)
    model = _ConvNet()
    params = list(model.parameters())
    opt = factory(params, lr=1e-2, precondition_frequency=3)
    for t in range(steps):
        if t == at and change is not None:
            change(model)
        for p, g in zip(params, full_rank_grads(params, t)):
            if zero == "in-place" and p.grad is not None:
                p.grad.copy_(g)
            else:
                p.grad = torch.empty_like(p).copy_(g)
        opt.step()
        opt.zero_grad(set_to_none=(zero == "none"))
    return params, opt


def _channels_last(model):
    model.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", COMPILED)
@pytest.mark.parametrize("zero", ["none", "in-place"])
@pytest.mark.parametrize("change", [_channels_last, lambda m: m.half()], ids=["channels_last", "half"])
def test_module_apply_mid_training_matches_reference(name, zero, change):
    ref, _ = _train(SOAP, 9, change, zero=zero)
    got, _ = _train(VARIANTS[name], 9, change, zero=zero)
    start = [p.detach().clone() for p in _train(SOAP, 0)[0]]
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
    tol = 1e-5 if ref[0].dtype == torch.float32 else 2e-3  # fp16 parameters round every step
    assert relative_deviation([p.float() for p in got], [p.float() for p in ref], start) < tol


def _flat_buffer_run(factory, steps=7):
    """Gradients as views of one user-owned flat buffer, averaged and zeroed by the loop (a manual all-reduce)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(5, 4), (4,), (3, 5)]]
    flat = torch.zeros(sum(p.numel() for p in params))
    views, offset = [], 0
    for p in params:
        views.append(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    for p, v in zip(params, views):
        p.grad = v
    opt = factory(params, precondition_frequency=2)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        flat.zero_()
        assert all(p.grad.abs().max() == 0 for p in params), "zeroing the user's buffer must clear the gradients"
        flat.add_(torch.randn(flat.shape, generator=gen))
        flat.mul_(0.5)
        opt.step()
        assert all(p.grad.data_ptr() == v.data_ptr() for p, v in zip(params, views)), ".grad was taken over"
    return params


@pytest.mark.parametrize("name", COMPILED)
def test_user_owned_flat_gradient_buffer(name):
    ref = _flat_buffer_run(SOAP)
    got = _flat_buffer_run(VARIANTS[name])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(got, ref))


@pytest.mark.parametrize("name", COMPILED)
def test_parameter_data_reassigned(name):
    """`p.data = new` between steps: the new memory is read and written, never the old one."""
    def run(factory):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
        opt = factory(params, precondition_frequency=2)
        gen = torch.Generator().manual_seed(5)
        old = None
        for t in range(6):
            if t == 3:
                old = params[0].data
                params[0].data = params[0].data.clone() * 0.5
                old_snapshot = old.clone()
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return params, old, old_snapshot

    ref, _, _ = run(SOAP)
    got, old, old_snapshot = run(VARIANTS[name])
    assert torch.equal(old, old_snapshot), "the optimizer wrote to the parameter's old memory"
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(got, ref))


def test_dtype_change_converts_state_and_says_so():
    """model.double() after the first steps: the state becomes float64 (with a warning), and training continues
    as SOAP does from the same state converted by hand."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, ref = CompiledSOAP(params, compile=False, precondition_frequency=2), SOAP(twins, precondition_frequency=2)
    gen = torch.Generator().manual_seed(5)
    grads = [[torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params] for _ in range(6)]
    for t in range(6):
        if t == 3:
            for p, q in zip(params, twins):
                p.data, q.data = p.data.double(), q.data.double()
            for s in ref.state.values():  # SOAP keeps its state dtype: convert it by hand as the reference point
                for k, v in list(s.items()):
                    if isinstance(v, torch.Tensor) and v.is_floating_point():
                        s[k] = v.double()
                    elif isinstance(v, list):
                        s[k] = [m.double() if isinstance(m, torch.Tensor) else m for m in v]
        for p, q, g in zip(params, twins, grads[t]):
            p.grad = g.to(p.dtype)
            q.grad = g.to(q.dtype)
        if t == 3:
            with pytest.warns(UserWarning, match="changed dtype from torch.float32 to torch.float64"):
                opt.step()
        else:
            opt.step()
        ref.step()
    assert opt.state[params[0]]["exp_avg"].dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in params)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(params, twins))


def test_shape_change_is_a_clear_error():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = CompiledSOAP([p], compile=False)
    for _ in range(2):
        p.grad = torch.randn(4, 3)
        opt.step()
    p.data = torch.randn(3, 4)
    p.grad = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"parameter 0 changed shape from \(4, 3\) to \(3, 4\)"):
        opt.step()


@pytest.mark.compile
def test_inductor_rounds_16bit_parameters_like_eager():
    """A bf16 parameter next to an fp32 one: Inductor must round where the eager code rounds (finding 7)."""
    def run(factory):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(8, 6).bfloat16()), torch.nn.Parameter(torch.randn(8, 6))]
        opt = factory(params, precondition_frequency=3, lr=1e-2)
        gen = torch.Generator().manual_seed(2)
        for _ in range(12):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.step()
        return params

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = run(VARIANTS["stacked-eager"])
        inductor = run(lambda ps, **kw: CompiledSOAP(ps, mode=None, **kw))
    assert torch.equal(eager[0], inductor[0])
