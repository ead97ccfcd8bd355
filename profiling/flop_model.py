"""FLOP count of a SOAP step from the cost model in docs/design.md §4 (matmuls and QR only).

What is counted, per parameter with at least one factor (a factor is an axis of size s <= max_precond_dim; 1-D
parameters have none unless precondition_1d):
  * one "unit" = rotating a tensor of N elements along every factored axis = sum over factored axes of 2·s·N flops.
    For an m×n matrix with both factors that is 2(m²n + mn²), the notes' unit. The factor update (G Gᵀ and Gᵀ G,
    one Gram matrix per factored axis, 2·s·N each) costs the same, so it is one unit too.
  * plain step: reference 5 units (project G, project back, momentum back and forth, factor update);
    batched/compiled 3 units (momentum rotated only when Q changes).
  * refresh step: 5 units for both (the batched path adds the 2 momentum rotations back), plus per factor
    M·Q = 2s³ and a Householder QR that forms Q, (8/3)s³: geqrf (4/3)s³ plus orgqr (4/3)s³, as
    compiled_soap.orthogonalization.flops and the sharding planner (compiled_soap.ownership.item_flops) count it.
Not counted: elementwise Adam math, norms, sorting and index_select, and the reference's extra Qᵀ(M Q) matmul for the
eigenvalue estimate (the model reuses P = M·Q for diag(QᵀMQ), docs/design.md §3-4). AdamW does no matmul: its FLOPs are None.
"""

from __future__ import annotations

PLAIN_UNITS = {"reference": 5, "batched": 3}
REFRESH_UNITS = 5
QR_FLOPS_PER_S3 = 8.0 / 3.0  # geqrf + orgqr
MQ_FLOPS_PER_S3 = 2.0


def factor_sizes(shape, max_precond_dim: int = 10000, precondition_1d: bool = False) -> list:
    """Size of each axis's factor, None where the axis gets none (mirrors SOAP's rule, merge_dims off)."""
    if len(shape) == 1 and not precondition_1d:
        return [None]
    return [s if s <= max_precond_dim else None for s in shape]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def unit_flops(shape, **kw) -> float:
    n = _numel(shape)
    return float(sum(2 * s * n for s in factor_sizes(shape, **kw) if s))


def refresh_extra_flops(shape, **kw) -> float:
    return float(sum((MQ_FLOPS_PER_S3 + QR_FLOPS_PER_S3) * s**3 for s in factor_sizes(shape, **kw) if s))


def n_factors(shapes, **kw) -> int:
    """Number of factors = QR calls per refresh."""
    return sum(1 for shape in shapes for s in factor_sizes(shape, **kw) if s)


def step_flops(shapes, variant: str | None, kind: str, **kw) -> float | None:
    """FLOPs of one step of `kind` ("plain" or "refresh") for `variant` ("reference", "batched" or None)."""
    if variant is None:
        return None
    units = sum(unit_flops(s, **kw) for s in shapes)
    if kind == "plain":
        return PLAIN_UNITS[variant] * units
    if kind == "refresh":
        return REFRESH_UNITS * units + sum(refresh_extra_flops(s, **kw) for s in shapes)
    raise ValueError(f"unknown step kind {kind!r}")


def amortized(plain: float | None, refresh: float | None, period: int) -> float | None:
    """Mean over one refresh period: (period-1) plain steps and one refresh."""
    if plain is None:
        return None
    if refresh is None:
        return plain
    return ((period - 1) * plain + refresh) / period
