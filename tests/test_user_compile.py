"""Inside a user's torch.compile (issue 28): a compiled training step that calls opt.step(), and
torch.compile(opt.step) on its own, each cold (compiled from the first call) and warm (after one eager step), with
an lr scheduler stepping between calls.

- CompiledSOAP's step is opaque to Dynamo (compilation.opaque_to_dynamo): the user's graph breaks around it and the
  step runs exactly as in eager code, its own compiled graphs included. So every case is bitwise the eager loop.
- The reference SOAP is traced, like the paper's soap.py. The model has two parameters of one shape and a weight and
  bias of one layer: the traps of reference.py's state lookup (a (4, 8) update added to a (4,) bias, or one
  parameter's code run silently for another of the same shape).

float64, so that "bitwise" is a strong statement and the Inductor case (other forward kernels) has the rounding bound
of tests/agreement.py.
"""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import VARIANTS
from graph_checks import CaptureBackend, check_cuda_capturable
from compiled_soap import CompiledSOAP
from tests.agreement import agree

CALLS = 7  # precondition_frequency 3: init, plain, plain, refresh, plain, plain, refresh


def _model(square=False):
    # square: every factor full rank from the first gradient (16 samples, width 4), so the first eigh has no null
    # space to fill at will (docs/spec.md trap 7) and runs that round differently stay close.
    torch.manual_seed(0)
    first = torch.nn.Linear(4, 4) if square else torch.nn.Linear(8, 4)
    return torch.nn.Sequential(first, torch.nn.Tanh(), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).double()


def _train(make_opt, how: str, warm: bool, outer_backend="aot_eager", square=False):
    """CALLS training steps; `how`: "eager", "train_step" (the whole step compiled) or "opt.step" (only the
    optimizer step compiled). Returns (parameters, optimizer)."""
    torch._dynamo.reset()
    model = _model(square)
    width = model[0].in_features
    opt = make_opt(model.parameters(), lr=1e-2, precondition_frequency=3)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, width, generator=gen, dtype=torch.float64),
                torch.randn(16, 4, generator=gen, dtype=torch.float64)) for _ in range(CALLS)]
    step = opt.step

    def train_step(x, y):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        step()
        return loss

    eager_step = train_step
    if how == "train_step":
        train_step = torch.compile(train_step, backend=outer_backend)
    elif how == "opt.step":
        step = torch.compile(opt.step, backend=outer_backend)
    for call, (x, y) in enumerate(batches):
        if warm and call == 0:
            step_now, step = step, opt.step
            eager_step(x, y)
            step = step_now
        else:
            train_step(x, y)
        schedule.step()
    return [p.detach().clone() for p in model.parameters()], opt


@functools.lru_cache(maxsize=None)
def _eager(name: str) -> list:
    return _train(VARIANTS[name], "eager", False)[0]


# CompiledSOAP traced by aot_eager: its own compile inside the user's (compile=False takes the same path through
# opaque_to_dynamo, with nothing compiled inside).
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("how", ["train_step", "opt.step"])
@pytest.mark.parametrize("name", ["soap", "aot-eager"])
def test_inside_a_user_compile_equals_eager(name, how, warm):
    want = _eager(name)
    got, opt = _train(VARIANTS[name], how, warm)
    assert not torch.equal(want[0], _model()[0].weight)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    if isinstance(opt, CompiledSOAP):
        assert opt.last_step_kind == "refresh"


def test_our_graphs_unchanged_under_a_user_compile():
    """The step graphs CompiledSOAP compiles inside a user's compiled train step are the two it compiles in eager
    code, and each passes the CUDA-capture checks (tests/graph_checks.py): the user's compile takes nothing from
    the one-graph-per-step design, and its own graph holds none of the step."""
    inner = CaptureBackend()
    _, opt = _train(lambda params, **kw: CompiledSOAP(params, backend=inner, **kw), "train_step", warm=False)
    assert len(inner.records) == 2  # plain and refresh, each compiled once
    for record in inner.records:
        check_cuda_capturable(record)

    outer = CaptureBackend()
    _train(lambda params, **kw: CompiledSOAP(params, compile=False, **kw), "train_step", warm=False,
           outer_backend=outer)
    # The user's graphs (forward, backward) change no input: no parameter update, no optimizer state, was traced.
    assert outer.records and not any(r.mutated_input_indices for r in outer.records)


@pytest.mark.compile
def test_inductor_outside_and_inside():
    """The user's step compiled by Inductor, CompiledSOAP with its defaults (Inductor, mode="reduce-overhead")
    inside: other kernels than the eager loop's on both sides, so within the float64 rounding bound of it. Square
    layers: with the (4, 8) weight, Inductor's backward gives a first gradient 1e-16 away, the first eigh fills the
    right factor's null space otherwise, and the runs part by a third of their movement (trap 7, not a fault)."""
    want, _ = _train(VARIANTS["stacked-eager"], "eager", False, square=True)
    got, opt = _train(CompiledSOAP, "train_step", False, outer_backend="inductor", square=True)
    print(agree(got, want, [p.detach() for p in _model(square=True).parameters()]))
    assert opt.compile_seconds > 0
