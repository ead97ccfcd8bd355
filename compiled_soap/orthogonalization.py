"""Orthogonalisation for the eigenbasis refresh: Q <- orth(F Q[:, order]) on a stack of square factors.

`householder` is the reference's choice (torch.linalg.qr), kept as the default. On CUDA it loops over the matrices
of a batch. `cholesky` is built from batched matmuls, `cholesky_ex` and `solve_triangular` only, with no host sync and
no data-dependent Python branch, so a whole refresh can live in one CUDA graph.

`cholesky` is shifted CholeskyQR (Fukaya et al., SISC 2020) made safe for the rank-deficient inputs SOAP produces
early in training (F Q with F PSD and singular, or an all-zero factor):
  1. columns are scaled to unit norm (the Q of Gram-Schmidt does not depend on column scales); zero columns become
     columns of a fixed orthogonal "fill" matrix W;
  2. two shifted passes; the pivots of the second (on an already well conditioned Q) tell the columns that carry no
     new direction (numerically dependent on the columns before them). Those are replaced by columns of W: any
     orthonormal completion is a valid Gram-Schmidt result there, and the kept columns keep their nested spans;
  3. more shifted passes, then a final unshifted one that brings orthogonality to rounding level. They have two
     jobs: orthonormalise the fill columns against the kept ones (a random completion has a condition number of
     order d), and lift the directions that are numerically singular without any pivot showing it (a spread
     spectrum shared by all columns, cond >> 1/u): pass 1 leaves those at rounding level and each shifted pass
     multiplies them by only about 1/sqrt(s). The count is fixed by d and dtype (see _fill_passes): 6 passes in
     fp32 up to d = 768, 7 above, 5 in fp64. Plain shifted CholeskyQR3 (3 passes) left |Q^T Q - I| = 2e-3 on
     SOAP-like fp32 factors at d = 768 (profiling/bench_orthogonalization.py inputs).
Every Cholesky that fails (info > 0) is retried with a larger shift, then replaced by a diagonal: never NaN.
The shift is c·u·d for unit columns, about the size of the rounding error of the computed Gram matrix; the paper's
11(mn + n(n+1))u is a worst-case bound that, in fp32 at d >= 256, is as large as the matrix itself.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
from torch import Tensor

__all__ = ["householder", "cholesky", "householder_outside_graph", "ORTHOGONALIZATIONS", "orthogonalize", "flops",
           "full_precision_matmul"]

SHIFT = 4.0  # s = SHIFT·u·d: measured, 2 already fails on rank-1 inputs at d = 768 in fp32 (CPU)
RETRY = 64.0  # a failed factorisation is retried once with RETRY·s
FILL_COND = 10.0  # [kept columns | fill columns] is assumed to have a condition number up to FILL_COND·d


def householder(x: Tensor) -> Tensor:
    """Q of the reduced Householder QR (LAPACK / cuSOLVER), for [d, d] or [..., d, d]."""
    return torch.linalg.qr(x)[0]


def cholesky(x: Tensor) -> Tensor:
    """Orthonormal Q whose first k columns span the first k columns of x wherever those are independent.

    x: [d, d] or [..., d, d], fp32 or fp64. Column signs may differ from LAPACK's. Dependent or zero columns get an
    orthonormal completion. The result is finite for every finite input.
    """
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"cholesky orthogonalisation needs float32 or float64, got {x.dtype}")
    if x.dim() < 2 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"cholesky orthogonalisation needs square matrices, got shape {tuple(x.shape)}")
    d = x.shape[-1]
    s = _shift(d, x.dtype)
    fill = fill_basis(d, x.dtype, x.device)
    q = _unit_columns(x, fill)
    q, _ = _cholqr_pass(q, s, RETRY * s)
    q, pivots = _cholqr_pass(q, s, RETRY * s)
    # After one pass every direction above the shift's resolution has a pivot near 1; what is left below sqrt(s)
    # is rounding noise pointing back into the span of the earlier columns.
    lost = (pivots < math.sqrt(s)).unsqueeze(-2)
    q = torch.where(lost, fill, q)
    for _ in range(_fill_passes(d, s, torch.finfo(x.dtype).eps / 2)):
        q, _ = _cholqr_pass(q, s, RETRY * s)
    q, _ = _cholqr_pass(q, 0.0, s)
    return q


@torch.library.custom_op("compiled_soap::householder_outside_graph", mutates_args=(),
                          tags=(torch.Tag.cudagraph_unsafe,))
def householder_outside_graph(x: Tensor) -> Tensor:
    """`householder` as an opaque op that Inductor keeps out of CUDA graphs (tag cudagraph_unsafe): with graph
    partitioning the refresh becomes graph replays around an eager QR. For a GPU/driver whose cuSOLVER QR cannot
    be captured; the result is bitwise `householder`'s."""
    return torch.linalg.qr(x)[0].clone(memory_format=torch.preserve_format)


@householder_outside_graph.register_fake
def _(x: Tensor) -> Tensor:
    # linalg.qr returns column-major matrices; the fake must say so, or the graph would plan the wrong strides.
    return x.new_empty(x.shape).transpose(-2, -1).contiguous().transpose(-2, -1)


ORTHOGONALIZATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "householder": householder, "cholesky": cholesky, "householder-outside-graph": householder_outside_graph}


def orthogonalize(x: Tensor, method: str) -> Tensor:
    """Dispatch on a method name from ORTHOGONALIZATIONS."""
    if method not in ORTHOGONALIZATIONS:  # a constant under torch.compile: no guard on data
        raise ValueError(f"unknown orthogonalization {method!r}; choose from {sorted(ORTHOGONALIZATIONS)}")
    return ORTHOGONALIZATIONS[method](x)


def flops(method: str, d: int, dtype: torch.dtype = torch.float32) -> float:
    """Floating-point operations for one d x d matrix, counted as implemented (2 per multiply-add)."""
    if method in ("householder", "householder-outside-graph"):
        return 8 * d**3 / 3  # geqrf 4/3 d^3 + orgqr (forming Q) 4/3 d^3
    if method == "cholesky":
        passes = 3 + _fill_passes(d, _shift(d, dtype), torch.finfo(dtype).eps / 2)
        # per pass: Gram 2d^3 (a full matmul), two Cholesky attempts d^3/3 each, triangular solve d^3
        return passes * (2 + 2 / 3 + 1) * d**3
    raise ValueError(f"unknown orthogonalization {method!r}; choose from {sorted(ORTHOGONALIZATIONS)}")


def fill_basis(d: int, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
    """A fixed orthogonal d x d matrix with no structure shared with typical data.

    The DCT-II basis with its rows permuted and sign-flipped by an integer hash: orthogonal (up to rounding), every
    column spread over all coordinates (unlike e_j), and not smooth (unlike the Fourier-like eigenvectors of
    stationary covariances). Computed from integers in-graph, so it is the same on every device and needs no RNG.
    """
    i = torch.arange(d, device=device)
    rows = torch.argsort(_hash(i))
    signs = 1 - 2 * (_hash(i + d) & 1)
    # (2 rows + 1) j mod 4d keeps the cosine's argument in [0, 2 pi) exactly, so the angle has no large-argument error
    phase = ((2 * rows[:, None] + 1) * i[None, :]) % (4 * d)
    w = torch.cos(phase.to(dtype) * (math.pi / (2 * d))) * math.sqrt(2 / d)
    w = torch.where(i[None, :] == 0, torch.full_like(w, 1 / math.sqrt(d)), w)
    return w * signs[:, None].to(dtype)


@contextlib.contextmanager
def full_precision_matmul() -> Iterator[None]:
    """Run fp32 matmuls in full IEEE precision (no TF32, no bf16 passes) and restore the settings on exit.

    CholeskyQR squares the condition number in the Gram matrix: under TF32 (10-bit mantissa) it breaks down near
    cond 45. Flags must not be toggled inside a compiled function, so the optimizer wraps its compiled call in this.
    Both APIs are kept consistent: the legacy one (set_float32_matmul_precision) and, where it exists, the per-backend
    one (torch.backends.{cuda,mkldnn}.matmul.fp32_precision, torch >= 2.9); reading the legacy getter raises while
    only the new API selected TF32, so that state is recognised and rebuilt rather than read.
    """
    backends = _per_backend_matmul()
    saved_backends = [b.fp32_precision for b in backends]
    try:
        saved_legacy = torch.get_float32_matmul_precision()
    except RuntimeError:
        saved_legacy = None  # mixed state: the legacy enum is "highest", a per-backend setting says tf32
    torch.set_float32_matmul_precision("highest")
    for b in backends:
        b.fp32_precision = "ieee"  # explicit: a global torch.backends.fp32_precision must not leak in
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved_legacy or "highest")
        for b, p in zip(backends, saved_backends):
            b.fp32_precision = p


def _per_backend_matmul() -> list:
    """The per-backend matmul precision objects that use the "ieee"/"tf32"/"bf16"/"none" names, if any."""
    found = []
    for module in (getattr(torch.backends, "cuda", None), getattr(torch.backends, "mkldnn", None)):
        matmul = getattr(module, "matmul", None)
        try:
            current = getattr(matmul, "fp32_precision", None)
        except (AttributeError, RuntimeError):
            current = None
        if current in ("ieee", "tf32", "bf16", "none"):
            found.append(matmul)
    return found


def _shift(d: int, dtype: torch.dtype) -> float:
    return SHIFT * (torch.finfo(dtype).eps / 2) * d


def _fill_passes(d: int, s: float, u: float) -> int:
    """Shifted passes after the detection pass; each maps a singular value sigma to sigma/sqrt(sigma^2 + s).

    Two needs, the larger wins: (1) fill columns: [kept | fill] has sigma_min down to about 1/(FILL_COND·d);
    (2) numerically singular inputs that no pivot flags (graded spectra, cond >> 1/u): pass 1 leaves their smallest
    singular value at rounding level, measured about u/3 (fp32, d = 768, SOAP-like F Q), and pass 2 lifts it once.
    Enough passes to reach 1/4 (cond <= 4), where the final unshifted pass is accurate to rounding.
    """
    return max(1, _lifts(1 / (FILL_COND * d), s), _lifts(u / 4, s) - 1)


def _lifts(sigma: float, s: float, target: float = 0.25) -> int:
    n = 0
    while sigma < target:
        sigma, n = sigma / math.sqrt(sigma * sigma + s), n + 1
    return n


def _hash(i: Tensor) -> Tensor:
    """A 32-bit integer mixer (xor-shift, multiply) on int64 tensors; multipliers < 2^29 keep products below 2^61."""
    h = (i * 0x9E3779B1 + 0x7F4A7C15) & 0xFFFFFFFF
    for mult in (0x045D9F3B, 0x119DE1F3):
        h = ((h ^ (h >> 16)) * mult) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _unit_columns(x: Tensor, fill: Tensor) -> Tensor:
    """x with unit-norm columns; exactly zero columns become the fill's. Scaling by the max first avoids overflow."""
    amax = x.abs().amax(dim=-2, keepdim=True)
    x = x / torch.where(amax > 0, amax, torch.ones_like(amax))
    norm = torch.linalg.vector_norm(x, dim=-2, keepdim=True)
    return torch.where(norm > 0, x / torch.where(norm > 0, norm, torch.ones_like(norm)), fill)


def _cholqr_pass(q: Tensor, shift: float, retry: float) -> tuple[Tensor, Tensor]:
    """One CholeskyQR pass q R^-1 with R^T R = q^T q + shift·I; also returns the pivots R_jj^2 minus the shift used."""
    r, used = _factor(q.mT @ q, shift, retry)
    pivots = torch.diagonal(r, dim1=-2, dim2=-1).square() - used.unsqueeze(-1)
    return torch.linalg.solve_triangular(r, q, upper=True, left=False), pivots


def _factor(a: Tensor, shift: float, retry: float) -> tuple[Tensor, Tensor]:
    """Upper Cholesky factor of a + shift·I, else of a + retry·I, else sqrt of the diagonal: finite whatever a is.

    cholesky_ex leaves NaN or garbage behind a failed pivot, so a failed item's factor is never used, only selected
    away with torch.where (no host decision). Returns the factor and the shift it includes, per item.
    """
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    r, info = torch.linalg.cholesky_ex(a + shift * eye, upper=True)
    r_retry, info_retry = torch.linalg.cholesky_ex(a + retry * eye, upper=True)
    tiny = torch.finfo(a.dtype).tiny
    diagonal = torch.diag_embed(torch.diagonal(a, dim1=-2, dim2=-1).nan_to_num(1.0).clamp(min=tiny).add(retry).sqrt())
    ok, ok_retry = info == 0, info_retry == 0
    r = torch.where(ok[..., None, None], r, torch.where(ok_retry[..., None, None], r_retry, diagonal))
    used = retry + (shift - retry) * ok.to(a.dtype)
    return r, used
