"""compiled_soap.orthogonalization: orthogonality, Gram-Schmidt spans and NaN-safety of the CholeskyQR path.

Every check compares against an independent computation (numpy, or torch.linalg.qr / svd in float64), never against
the implementation itself. Inputs cover what SOAP produces: F Q with F PSD and rank deficient, all-zero factors,
condition numbers far past 1/u, d = 1.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from compiled_soap import orthogonalization as orth
from compiled_soap.orthogonalization import cholesky, householder

ORTH_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
ANGLE_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
KINDS = ["randn", "cond1e4", "cond1e8", "cond1e12", "rank1", "rank_half", "zero", "soap", "soap_rank1", "soap_graded",
         "soap_wide", "dup"]


def random_orthogonal(b: int, d: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(b, d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def with_singular_values(s: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """U diag(s) V^T with random orthogonal U, V (float64)."""
    d = s.shape[-1]
    u, v = random_orthogonal(1, d, g)[0], random_orthogonal(1, d, g)[0]
    return (u * s) @ v.T


def soap_input(d: int, rank: int, g: torch.Generator) -> torch.Tensor:
    """F Q[:, order] with F = G G^T PSD of the given rank and Q orthogonal, sorted like SOAP's refresh."""
    a = torch.randn(d, rank, generator=g, dtype=torch.float64)
    f, q = a @ a.T, random_orthogonal(1, d, g)[0]
    p = f @ q
    order = torch.argsort((q * p).sum(0), descending=True)
    return p[:, order]


def make(kind: str, d: int, g: torch.Generator) -> torch.Tensor:
    if kind == "randn":
        return torch.randn(d, d, generator=g, dtype=torch.float64)
    if kind.startswith("cond"):
        return with_singular_values(torch.logspace(0, -math.log10(float(kind[4:])), d, dtype=torch.float64), g)
    if kind in ("rank1", "rank_half"):
        s = torch.zeros(d, dtype=torch.float64)
        s[: 1 if kind == "rank1" else max(1, d // 2)] = 1.0
        return with_singular_values(s, g)
    if kind == "zero":
        return torch.zeros(d, d, dtype=torch.float64)
    if kind == "soap":
        return soap_input(d, max(1, d // 4), g)
    if kind == "soap_rank1":
        return soap_input(d, 1, g)
    if kind == "soap_graded":  # F's spectrum spans 1e-12, old basis 1e-3 off its eigenvectors: cond(X) >> 1/u
        u = random_orthogonal(1, d, g)[0]
        f = (u * torch.logspace(0, -12, d, dtype=torch.float64)) @ u.T
        q = u @ torch.linalg.matrix_exp(1e-3 * skew(d, g))
        p = f @ q
        return p[:, torch.argsort((q * p).sum(0), descending=True)]
    if kind == "soap_wide":  # like a trained factor: F = (G G^T)^2, G = rank 16 + 30% noise, basis from an older F
        f_old, f = wide_factor(d, g), wide_factor(d, g)
        q = torch.linalg.eigh(f_old + f)[1]
        p = f @ q
        return p[:, torch.argsort((q * p).sum(0), descending=True)]
    if kind == "dup":  # every column the same vector up to sign and scale
        v = torch.randn(d, 1, generator=g, dtype=torch.float64)
        return v * torch.randn(1, d, generator=g, dtype=torch.float64)
    raise ValueError(kind)


def wide_factor(d: int, g: torch.Generator) -> torch.Tensor:
    """(G G^T)^2: a spread spectrum whose smallest singular directions are shared by all columns of F Q, so no
    Gram-Schmidt pivot shows them (cond of F Q with unit columns about 1e10 at d = 256; needs every pass)."""
    a = torch.randn(d, 16, generator=g, dtype=torch.float64) / torch.arange(1, 17, dtype=torch.float64)
    grad = a @ torch.randn(16, d, generator=g, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=g,
                                                                                       dtype=torch.float64)
    f = grad @ grad.T
    return f @ f


def orthogonality_error(q: torch.Tensor) -> float:
    q = q.double()
    return (q.mT @ q - torch.eye(q.shape[-1], dtype=torch.float64)).abs().max().item()


def sin_largest_angle(a: np.ndarray, b: np.ndarray) -> float:
    """sin of the largest principal angle between the column spans of a and b (numpy, float64)."""
    qa, qb = np.linalg.qr(a)[0], np.linalg.qr(b)[0]
    return float(np.linalg.norm(qb - qa @ (qa.T @ qb), 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [1, 3, 64, 256])
def test_orthonormal_for_every_input_class_in_one_batch(d, dtype):
    g = torch.Generator().manual_seed(d)
    x = torch.stack([make(k, d, g) for k in KINDS]).to(dtype)
    q = cholesky(x)
    assert q.shape == x.shape and q.dtype == dtype
    assert torch.isfinite(q).all()
    errors = {k: orthogonality_error(q[i]) for i, k in enumerate(KINDS)}
    assert max(errors.values()) <= ORTH_TOL[dtype], errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_householder_up_to_column_signs_when_well_conditioned(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 48, 48, generator=g, dtype=torch.float64)
    q = cholesky(x.to(dtype)).double()
    h = torch.linalg.qr(x)[0]
    signs = torch.sign((q * h).sum(-2, keepdim=True))
    assert (q - h * signs).abs().max().item() <= {torch.float32: 2e-4, torch.float64: 1e-11}[dtype]


def gap_inputs(d: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs whose first k columns are well conditioned (cond 10) and span U_k exactly; the rest are ugly."""
    out = []
    u = random_orthogonal(1, d, g)[0]
    lead = (u[:, :k] * torch.logspace(0, -1, k, dtype=torch.float64)) @ random_orthogonal(1, k, g)[0].T
    tails = [
        u[:, :1] @ torch.randn(1, d - k, generator=g, dtype=torch.float64),  # rank 1, inside span(U_k)
        with_singular_values(torch.logspace(0, -12, d, dtype=torch.float64), g)[:, : d - k],
        torch.zeros(d, d - k, dtype=torch.float64),
        torch.randn(d, d - k, generator=g, dtype=torch.float64),
    ]
    for tail in tails:
        out.append(torch.cat([lead, tail], 1))
    # SOAP form: F with k dominant eigenvalues (1..2), the rest 1e-7 or exactly 0, and an old basis close to F's
    # eigenvectors; the first k sorted columns of F Q then span the dominant eigenspace up to the basis error.
    for floor in (1e-7, 0.0):
        lam = torch.cat([torch.linspace(2, 1, k), torch.full((d - k,), floor)]).double()
        f = (u * lam) @ u.T
        q_old = u @ torch.linalg.matrix_exp(1e-2 * skew(d, g))
        p = f @ q_old
        order = torch.argsort((q_old * p).sum(0), descending=True)
        out.append(p[:, order])
    return torch.stack(out), u[:, :k]


def skew(d: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    return a - a.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [3, 64, 256])
def test_span_of_leading_columns_matches_householder_where_there_is_a_gap(d, dtype):
    k = max(1, d // 3)
    x, u_k = gap_inputs(d, k, torch.Generator().manual_seed(10 + d))
    q = cholesky(x.to(dtype)).double().numpy()
    h = torch.linalg.qr(x)[0].numpy()  # float64 Householder on the same (un-rounded) input
    for i in range(x.shape[0]):
        angle = sin_largest_angle(q[i, :, :k], h[i, :, :k])
        assert angle <= ANGLE_TOL[dtype], (i, angle)
        if i < 4:  # the constructed ones: the span is known exactly
            assert sin_largest_angle(q[i, :, :k], u_k.numpy()) <= ANGLE_TOL[dtype], i
        assert orthogonality_error(torch.from_numpy(q[i])) <= ORTH_TOL[dtype], i


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_columns_get_an_orthonormal_completion(dtype):
    g = torch.Generator().manual_seed(3)
    d = 32
    x = torch.randn(2, d, d, generator=g, dtype=torch.float64)
    zero_cols = [0, 5, 6, 31]
    x[0, :, zero_cols] = 0.0
    x[1] = 0.0
    q = cholesky(x.to(dtype))
    assert torch.isfinite(q).all()
    assert max(orthogonality_error(q[0]), orthogonality_error(q[1])) <= ORTH_TOL[dtype]
    # Gram-Schmidt nesting: every nonzero column j of x lies in the span of the first j + 1 columns of Q (the zero
    # columns' completions are part of those spans, as they are for Householder)
    xs = x[0] / x[0].norm(dim=0).clamp(min=1e-300)
    for j in range(d):
        head = q[0, :, : j + 1].double()
        residual = xs[:, : j + 1] - head @ (head.T @ xs[:, : j + 1])
        assert residual.abs().max().item() <= ANGLE_TOL[dtype], j


def test_d_equal_1_and_unbatched_input():
    x = torch.tensor([[[2.0]], [[-3.0]], [[0.0]], [[1e-40]]])
    q = cholesky(x)
    assert torch.equal(q.abs(), torch.ones_like(q))
    y = torch.randn(5, 5, dtype=torch.float64)
    q2 = cholesky(y)
    assert q2.shape == (5, 5)
    assert torch.allclose(q2, cholesky(y.unsqueeze(0))[0], rtol=0, atol=1e-14)


@pytest.mark.parametrize("scale", [1e-30, 1e-40, 1e30, 1e35])
def test_extreme_scales_float32(scale):
    g = torch.Generator().manual_seed(4)
    x = torch.stack([make("soap", 24, g), make("randn", 24, g), make("rank1", 24, g)]).float()
    x = x / x.abs().amax(dim=(-2, -1), keepdim=True)
    q = cholesky(x * scale)
    assert torch.isfinite(q).all()
    assert max(orthogonality_error(q[i]) for i in range(3)) <= ORTH_TOL[torch.float32]
    # the full-rank one keeps its spans (1e-40 is subnormal: 23 bits become fewer, hence the looser bound)
    h = np.linalg.qr((x[1] * scale).double().numpy())[0]
    assert sin_largest_angle(q[1, :, :12].double().numpy(), h[:, :12]) <= (1e-2 if scale < 1e-38 else 1e-4)


def test_factor_is_finite_whatever_the_matrix():
    a = torch.stack([
        torch.diag(torch.tensor([1.0, -1.0, 2.0])),  # indefinite: both attempts fail
        torch.full((3, 3), float("nan")),  # garbage in
        -torch.eye(3),
        torch.eye(3),
    ])
    r, used = orth._factor(a, 1e-6, 1e-4)
    assert torch.isfinite(r).all() and torch.isfinite(used).all()
    assert torch.equal(r, torch.triu(r)) and (torch.diagonal(r, dim1=-2, dim2=-1) > 0).all()
    assert torch.allclose(r[3], torch.eye(3) * math.sqrt(1 + 1e-6))
    assert used.tolist() == pytest.approx([1e-4, 1e-4, 1e-4, 1e-6])


def test_no_nan_when_every_cholesky_fails(monkeypatch):
    real = torch.linalg.cholesky_ex

    def failing(a, upper=False):
        r, info = real(a, upper=upper)
        return torch.full_like(r, float("nan")), torch.ones_like(info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    g = torch.Generator().manual_seed(5)
    x = torch.stack([make(k, 16, g) for k in KINDS]).float()
    assert torch.isfinite(cholesky(x)).all()


def test_first_attempt_failing_falls_back_to_the_retry_shift(monkeypatch):
    """Every first Cholesky attempt (the unretried shift) fails with NaN; the retries must still orthonormalise."""
    real, calls = torch.linalg.cholesky_ex, []

    def every_other_fails(a, upper=False):
        r, info = real(a, upper=upper)
        calls.append(1)
        if len(calls) % 2 == 1:
            return torch.full_like(r, float("nan")), torch.ones_like(info)
        return r, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", every_other_fails)
    g = torch.Generator().manual_seed(6)
    x = torch.stack([make(k, 32, g) for k in KINDS])
    q = cholesky(x)
    assert len(calls) % 2 == 0 and len(calls) >= 8
    assert max(orthogonality_error(q[i]) for i in range(len(KINDS))) <= ORTH_TOL[torch.float64]


def test_rejects_what_it_cannot_do():
    with pytest.raises(TypeError):
        cholesky(torch.zeros(2, 4, 4, dtype=torch.float16))
    with pytest.raises(ValueError):
        cholesky(torch.zeros(2, 4, 3))
    with pytest.raises(ValueError):
        orth.orthogonalize(torch.eye(3), "gram-schmidt")
    with pytest.raises(ValueError):
        orth.flops("gram-schmidt", 8)


def test_dispatch_table():
    assert set(orth.ORTHOGONALIZATIONS) == {"householder", "cholesky", "householder-outside-graph"}
    x = torch.randn(2, 6, 6, dtype=torch.float64)
    assert torch.equal(orth.orthogonalize(x, "householder"), torch.linalg.qr(x)[0])
    outside = orth.orthogonalize(x, "householder-outside-graph")
    assert torch.equal(outside, torch.linalg.qr(x)[0]) and outside.stride() == torch.linalg.qr(x)[0].stride()
    assert torch.equal(orth.orthogonalize(x, "cholesky"), cholesky(x))
    assert torch.equal(householder(x), torch.linalg.qr(x)[0])


@pytest.mark.parametrize("method", ["householder", "cholesky"])
def test_traces_with_fullgraph_and_matches_eager(method):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(7)
    x = torch.stack([make(k, 16, g) for k in ("soap", "rank_half", "zero")]).float()
    compiled = torch.compile(lambda t: orth.orthogonalize(t, method), fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x), orth.ORTHOGONALIZATIONS[method](x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [1, 40, 300])
def test_flop_model_counts_the_operations_cholesky_runs(d, dtype):
    from torch.utils._python_dispatch import TorchDispatchMode

    counted = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in ("mm", "bmm"):
                (m, k), n = args[0].shape[-2:], args[1].shape[-1]
                counted.append(2 * m * k * n * (args[0].numel() // (m * k)))
            elif name == "linalg_cholesky_ex":
                counted.append(args[0].shape[-1] ** 3 / 3 * (args[0].numel() // args[0].shape[-1] ** 2))
            elif name == "linalg_solve_triangular":
                counted.append(args[0].shape[-1] * args[1].numel())
            return out

    x = torch.randn(2, d, d, dtype=dtype)
    with Count():
        cholesky(x)
    assert sum(counted) == pytest.approx(2 * orth.flops("cholesky", d, dtype))
    assert orth.flops("householder", d) == pytest.approx(8 * d**3 / 3)


@pytest.fixture
def restore_matmul_precision():
    saved = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(saved)


def precision_state():
    cuda, mkldnn = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    return cuda.fp32_precision, mkldnn.fp32_precision


@pytest.mark.parametrize("setup", ["default", "legacy_high", "legacy_medium", "new_api_tf32_only"])
def test_full_precision_matmul_sets_ieee_and_restores(setup, restore_matmul_precision):
    torch.set_float32_matmul_precision("highest")
    if setup == "legacy_high":
        torch.set_float32_matmul_precision("high")
    elif setup == "legacy_medium":
        torch.set_float32_matmul_precision("medium")
    elif setup == "new_api_tf32_only":
        torch.backends.cuda.matmul.fp32_precision = "tf32"  # makes the legacy getter raise
    before = precision_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with orth.full_precision_matmul():
            assert torch.get_float32_matmul_precision() == "highest"
            assert precision_state() == ("ieee", "ieee")
            assert torch.backends.cuda.matmul.allow_tf32 is False
    assert precision_state() == before
    if setup != "new_api_tf32_only":
        assert torch.get_float32_matmul_precision() == {"legacy_high": "high", "legacy_medium": "medium"}.get(
            setup, "highest")
    else:
        with pytest.raises(RuntimeError):  # the same mixed state as before, not a cleaned-up one
            torch.get_float32_matmul_precision()
