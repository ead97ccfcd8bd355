"""The refresh's orthogonalisation methods inside the optimizers (orthogonalization=...): CholeskyQR follows the
paper's Householder trajectory, and the Householder QR kept outside the CUDA graph is bitwise the in-graph one."""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import full_rank_grads, make_params, relative_deviation
from graph_checks import CaptureBackend, find_problems
from test_robustness import _long_run
from compiled_soap import SOAP, CompiledSOAP

SHAPES = [(6, 4), (5, 5), (3, 4, 2), (3,)]  # every factor full rank by the first refresh (trap 7)


def _train(factory, calls=13, dtype=torch.float64):
    params = make_params(SHAPES, dtype)
    start = [p.detach().clone() for p in params]
    opt = factory(params, precondition_frequency=2, precondition_1d=True)
    for t in range(calls):
        for p, g in zip(params, full_rank_grads(params, t)):
            p.grad = g
        opt.step()
    return params, start, opt


@pytest.mark.parametrize("variant", ["stacked-eager", "aot-eager"])
def test_cholesky_follows_householder_fp64(variant):
    """Full-rank gradient sequences, fp64: the cholesky run equals the paper's (SOAP, Householder) to 1e-8 of the
    movement, and SOAP's own readable cholesky variant (Householder with Gram-Schmidt signs) agrees too."""
    extra = {"compile": False} if variant == "stacked-eager" else {"backend": "aot_eager"}
    ref, start, _ = _train(SOAP)
    ref_chol, _, _ = _train(functools.partial(SOAP, orthogonalization="cholesky"))
    got, _, opt = _train(functools.partial(CompiledSOAP, orthogonalization="cholesky", **extra))
    assert relative_deviation(got, ref, start) < 1e-8
    assert relative_deviation(got, ref_chol, start) < 1e-8
    for p in got:  # the bases stay orthonormal
        for q in opt.state[p]["Q"]:
            if q is not None:
                torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0], dtype=q.dtype), atol=1e-12, rtol=0)


def test_cholesky_within_the_references_own_sensitivity_fp32_long_run():
    """1000 fp32 steps: CompiledSOAP with cholesky deviates from SOAP no more than SOAP deviates from itself when
    one weight is moved by one ulp (times the same margin the Householder long run allows)."""
    chol = functools.partial(CompiledSOAP, compile=False, orthogonalization="cholesky")
    _, _, curve, _ = _long_run([SOAP, chol], torch.float32)
    _, _, control, _ = _long_run([SOAP, SOAP], torch.float32, perturb=True)
    assert max(d for _, d in curve) < 10 * max(d for _, d in control)


def test_householder_outside_graph_is_bitwise_and_marked_for_partitioning():
    """Forced on CPU: the refresh graph calls QR as an opaque op tagged cudagraph_unsafe (the one node Inductor's
    partitioning keeps out of the CUDA graphs: the only problem the capture checks report), and the results are
    bitwise those of the in-graph QR."""
    in_graph, _, _ = _train(functools.partial(CompiledSOAP, backend="aot_eager"), calls=7)
    backend = CaptureBackend()
    outside, _, _ = _train(functools.partial(CompiledSOAP, backend=backend,
                                             orthogonalization="householder-outside-graph"), calls=7)
    assert all(torch.equal(a, b) for a, b in zip(in_graph, outside))
    op = torch.ops.compiled_soap.householder_outside_graph.default
    assert torch.Tag.cudagraph_unsafe in op.tags
    refresh = [r for r in backend.records if any(n.target is op for n in r.forward_gm.graph.nodes)]
    assert len(refresh) == 1
    problems = find_problems(refresh[0], ["ops"])["ops"]
    assert problems and all("householder_outside_graph" in p for p in problems), problems
