"""Shared test fixtures and helpers; the optimizer variants come from the one registry, tests/registry.py.

Every equivalence and contract test that says `variant` runs for each default entry of the registry: the reference
`SOAP` and `CompiledSOAP` eagerly (the stacked math without tracing) and traced by Dynamo + AOTAutograd
(`aot_eager`). Inductor on CPU takes minutes to compile, so it is a separate, opt-in entry (`INDUCTOR`) used by a few
tests.
"""

from __future__ import annotations

import pytest
import torch

from registry import BY_NAME, REGISTRY

VARIANTS = {v.name: v for v in REGISTRY if not v.slow}
FAST_VARIANTS = {k: VARIANTS[k] for k in ("soap", "stacked-eager")}
INDUCTOR = BY_NAME["inductor"]


@pytest.fixture(autouse=True)
def _one_thread():
    """The tensors are tiny: intra-op threads only contend for the (shared) cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=list(VARIANTS))
def variant(request):
    """A factory with SOAP's signature: variant(params, **hyperparameters)."""
    return VARIANTS[request.param]


@pytest.fixture(params=list(FAST_VARIANTS))
def fast_variant(request):
    return FAST_VARIANTS[request.param]


def make_params(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def full_rank_grads(params, call, seed=100):
    """Gradients for one call: integer-valued at each parameter's first call (exact Gram matrices in every
    implementation, so the same initial eigh input; docs/spec.md trap 7), then random with uneven scales."""
    gen = torch.Generator().manual_seed(seed + call)
    out = []
    for p in params:
        if call == 0:
            out.append(torch.randint(-3, 4, p.shape, generator=gen).to(p.dtype))
        else:
            scale = 1 + torch.arange(p.numel()).reshape(p.shape) % 3
            out.append((torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(p.dtype))
    return out


def relative_deviation(a, b, start):
    """|a - b| over the whole parameter movement |a - start| (one number over all parameters)."""
    move = sum(float((x.detach() - s.detach()).double().norm() ** 2) for x, s in zip(a, start)) ** 0.5
    dev = sum(float((x.detach() - y.detach()).double().norm() ** 2) for x, y in zip(a, b)) ** 0.5
    return dev / max(move, 1e-300)


def train(opt, params, calls, grads=full_rank_grads, start=0):
    """The training loop of the tests: `calls` optimizer steps with `grads(params, call)` as the gradients (None for
    a parameter without one), calls numbered from `start`."""
    for call in range(start, start + calls):
        for p, g in zip(params, grads(params, call)):
            p.grad = None if g is None else g.clone()
        opt.step()
    return params


def bitwise_equal(xs, ys) -> bool:
    return all(torch.equal(x.detach(), y.detach()) for x, y in zip(xs, ys))
