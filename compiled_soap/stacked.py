"""The stacked math: SOAP for a whole bucket of same-shaped parameters at once, as pure tensor functions.

`plain_step` and `refresh_step` have no Python side effects and no data-dependent control flow, so each compiles
to one graph (and on CUDA one graph replay per optimizer step). `initialize` runs eagerly: it needs eigh, which
syncs with the host and cannot be captured.

Per bucket (a `BucketPlan` says its static shape), the tensors are
    grad         [B, *shape]         the gathered gradients (parameter dtype)
    exp_avg      [B, *merged_shape]  M, kept in the current eigenbasis
    exp_avg_sq   [B, *merged_shape]  V, in the current eigenbasis (only ever permuted)
    factors      per merged axis: [B, d, d] or None (no factor: identity on that axis)
    eigenbases   per merged axis: [B, d, d] or None
    index        [B] int64, the parameters' positions in the per-parameter tensors below
    params       the B parameter tensors, updated in place
and per parameter over the whole optimizer ("items"):
    step [N] int64, skipped [N] int64, has_grad [N] bool, group [N] int64,
    shampoo_beta [N] float64, frequency [N] int64, and hyper [G, 7] float64 (one row per param group).

Unlike the reference, M is rotated only when the basis changes (at a refresh) instead of a round trip through the
same basis every step: same mathematics (spec §3.10), 3 instead of 5 matmul units per plain step.
"""

from __future__ import annotations

from typing import Optional

import torch

from .planning import BucketPlan, from_merged, to_merged

# Columns of items["hyper"]; values come from the param groups, written by the optimizer before each step.
LR, BETA1, BETA2, EPS, WEIGHT_DECAY, CORRECT_BIAS, NORMALIZE_GRADS = range(7)
N_HYPER = 7


def _per_item(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a [B] vector against a [B, ...] tensor."""
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1)))


def gram(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Mode-`axis` Gram matrix of each item: contract every other axis of x with itself. [B, d, d]."""
    xa = x.movedim(axis + 1, 1).reshape(x.shape[0], x.shape[axis + 1], -1)
    return xa @ xa.transpose(1, 2)


def _item_gram(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Mode-`axis` Gram matrix of one item as a single 2-D matrix product: [d, rest] @ [rest, d]."""
    others = [a for a in range(x.dim()) if a != axis]
    return x.permute(axis, *others).reshape(x.shape[axis], -1) @ x.permute(*others, axis).reshape(-1, x.shape[axis])


def _along_axis(x: torch.Tensor, q: torch.Tensor, axis: int) -> torch.Tensor:
    """y[..., j, ...] = sum_i x[..., i, ...] q[i, j] along `axis` of each item."""
    xm = x.movedim(axis + 1, -1)
    y = (xm.reshape(x.shape[0], -1, xm.shape[-1]) @ q).reshape(xm.shape)
    return y.movedim(-1, axis + 1)


def project(x: torch.Tensor, eigenbases: list) -> torch.Tensor:
    """Into the eigenbasis: Q_k^T along every axis k that has one (2-D: Q_L^T X Q_R)."""
    for axis, q in enumerate(eigenbases):
        if q is not None:
            x = _along_axis(x, q, axis)
    return x


def project_back(x: torch.Tensor, eigenbases: list) -> torch.Tensor:
    """Out of the eigenbasis: Q_k along every axis k that has one (2-D: Q_L X Q_R^T)."""
    for axis, q in enumerate(eigenbases):
        if q is not None:
            x = _along_axis(x, q.transpose(1, 2), axis)
    return x


def eigenbasis(factor: torch.Tensor) -> torch.Tensor:
    """Initial eigenbases of a [B, d, d] stack: eigenvectors by descending eigenvalue (spec §3, first call)."""
    eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
    try:
        _, q = torch.linalg.eigh(factor + 1e-30 * eye)
    except RuntimeError:
        # Like the reference, retry only the matrices that fail, in fp64.
        qs = []
        for f in factor:
            try:
                qs.append(torch.linalg.eigh(f + 1e-30 * eye)[1])
            except RuntimeError:
                qs.append(torch.linalg.eigh(f.double() + 1e-30 * eye.double())[1].to(f.dtype))
        q = torch.stack(qs)
    return q.flip(-1)


def initialize(plan: BucketPlan, grad: torch.Tensor, shampoo_beta: torch.Tensor):
    """First call of a bucket's parameters: factors lerped once from zero, eigenbases by eigh. Eager only.

    Returns (factors, eigenbases), lists over merged axes with None where an axis has no factor.
    """
    g = to_merged(grad, plan.layout).to(plan.state_dtype)
    weight = (1 - shampoo_beta).to(plan.state_dtype).reshape(-1, 1, 1)
    factors: list[Optional[torch.Tensor]] = []
    bases: list[Optional[torch.Tensor]] = []
    for axis, size in enumerate(plan.layout.factor_sizes):
        if size is None:
            factors.append(None)
            bases.append(None)
            continue
        # Spec trap 7: after one gradient a factor is usually rank deficient, and the null-space eigenvectors eigh
        # returns are decided by the rounding of the factor. One matrix product per item (as in the per-parameter
        # algorithm) instead of a batched one (whose small-size CPU kernel sums in another order) gives the same
        # rounding, hence the same initial basis. Eager and once per parameter, so the loop costs nothing.
        gg = torch.stack([_item_gram(x, axis) for x in g])
        f = torch.lerp(torch.zeros_like(gg), gg, weight)
        factors.append(f)
        bases.append(eigenbasis(f))
    return factors, bases


def _bucket_step(plan: BucketPlan, b: dict, items: dict, refresh: bool) -> None:
    sdtype = plan.state_dtype
    idx = b["index"]
    hyper = items["hyper"].index_select(0, items["group"].index_select(0, idx))  # [B, 7] float64
    beta1, beta2 = hyper[:, BETA1], hyper[:, BETA2]
    as_state = lambda v, like: _per_item(v.to(sdtype), like)  # noqa: E731

    grad = to_merged(b["grad"], plan.layout).to(sdtype)
    finite = torch.isfinite(grad).reshape(grad.shape[0], -1).all(dim=1)
    has_grad = items["has_grad"].index_select(0, idx)
    active = has_grad & finite
    # A skipped item's gradient is replaced by zeros so that nothing below can produce NaN (QR, sort), and every
    # result of a skipped item is then discarded with torch.where: its state stays bit-identical.
    grad = torch.where(_per_item(active, grad), grad, torch.zeros_like(grad))
    step = items["step"].index_select(0, idx) + active.long()

    # Spec §3.1-3.4: project, then the moments (multiply then add) and the denominator.
    m_old, v_old = b["exp_avg"], b["exp_avg_sq"]
    eigenbases = b["eigenbases"]
    g_proj = project(grad, eigenbases)
    m = m_old * as_state(beta1, m_old) + g_proj * as_state(1 - beta1, m_old)
    v = v_old * as_state(beta2, v_old) + g_proj.square() * as_state(1 - beta2, v_old)
    denom = v.sqrt() + as_state(hyper[:, EPS], v)

    # §3.5: bias correction folded into the step size, in float64 like the reference's Python scalars.
    t = step.clamp(min=1).to(torch.float64)
    corrected = hyper[:, LR] * (1 - beta2**t).sqrt() / (1 - beta1**t)
    step_size = torch.where(hyper[:, CORRECT_BIAS] > 0, corrected, hyper[:, LR])

    # §3.6-3.7: back to parameter space, optional unit-RMS normalisation.
    update = project_back(m / denom, eigenbases)
    rms = update.square().reshape(update.shape[0], -1).mean(dim=1).sqrt()
    normalized = update / _per_item(1e-30 + rms, update)
    update = torch.where(_per_item(hyper[:, NORMALIZE_GRADS] > 0, update), normalized, update)
    update = from_merged(update, plan.layout)

    # §3.8-3.9 / trap 5: W -= eta U, then decoupled weight decay on the new W with the plain lr, only when > 0.
    # The parameter dtype is rounded after each of the two updates, as the reference's two in-place adds do.
    neg_step = (-step_size).to(sdtype)
    neg_decay = (-hyper[:, LR] * hyper[:, WEIGHT_DECAY]).to(sdtype)
    decays = hyper[:, WEIGHT_DECAY] > 0
    for i, p in enumerate(b["params"]):
        w = (p.to(sdtype) + neg_step[i] * update[i]).to(p.dtype)
        wd = w.to(sdtype)
        w = torch.where(decays[i], (wd + neg_decay[i] * wd).to(p.dtype), w)
        p.copy_(torch.where(active[i], w, p))

    # §3.10b / trap 2: the factors see the gradient only after it was used.
    lerp_weight = (1 - items["shampoo_beta"].index_select(0, idx)).to(sdtype).reshape(-1, 1, 1)
    new_factors = []
    for axis, f in enumerate(b["factors"]):
        if f is None:
            new_factors.append(None)
            continue
        updated = torch.lerp(f, gram(grad, axis), lerp_weight)
        new_factors.append(torch.where(_per_item(active, f), updated, f))

    if refresh:
        m, v, new_bases = _refresh(b, items, idx, active, step, m, v, new_factors)
        for q, q_new in zip(eigenbases, new_bases):
            if q is not None:
                q.copy_(q_new)

    m_old.copy_(torch.where(_per_item(active, m), m, m_old))
    v_old.copy_(torch.where(_per_item(active, v), v, v_old))
    for f, f_new in zip(b["factors"], new_factors):
        if f is not None:
            f.copy_(f_new)
    items["step"].index_copy_(0, idx, step)
    items["skipped"].index_add_(0, idx, (has_grad & ~finite).long())


def _refresh(b, items, idx, active, step, m, v, factors):
    """Spec §4 for the items whose step is a multiple of their refresh period; the others keep M, V and Q."""
    due = active & (step % items["frequency"].index_select(0, idx) == 0)
    old_bases = b["eigenbases"]
    new_bases = []
    v_sorted = v
    for axis, (f, q) in enumerate(zip(factors, old_bases)):
        if f is None:
            new_bases.append(None)
            continue
        # Trap 3: eigenvalues estimated with the OLD basis and the UPDATED factor; diag(Q^T F Q) reuses P = F Q.
        p = f @ q
        estimated = (q * p).sum(dim=1)
        order = torch.argsort(estimated, dim=-1, descending=True)
        # Trap 4: V is permuted along this axis with the same sort, never rotated.
        shape = [v.shape[0]] + [1] * (v.dim() - 1)
        shape[axis + 1] = order.shape[1]
        v_sorted = torch.gather(v_sorted, axis + 1, order.reshape(shape).expand(v.shape))
        # One power-iteration step: F (Q[:, order]) = P[:, order], orthonormalised by Householder QR.
        q_new, _ = torch.linalg.qr(torch.gather(p, 2, order.unsqueeze(1).expand_as(p)))
        new_bases.append(torch.where(_per_item(due, q), q_new, q))
    # M follows the change of basis (the seed PR's bug was to skip this on one path): out with the old, in with the new.
    m_rotated = project(project_back(m, old_bases), new_bases)
    m = torch.where(_per_item(due, m), m_rotated, m)
    v = torch.where(_per_item(due, v), v_sorted, v)
    return m, v, new_bases


def _step(plans: tuple[BucketPlan, ...], buckets: list[dict], items: dict, refresh: bool) -> None:
    for plan, b in zip(plans, buckets):
        _bucket_step(plan, b, items, refresh)


def plain_step(plans: tuple[BucketPlan, ...], buckets: list[dict], items: dict) -> None:
    """One SOAP update (spec §3, later calls) of every bucket, no eigenbasis refresh. All updates in place."""
    _step(plans, buckets, items, refresh=False)


def refresh_step(plans: tuple[BucketPlan, ...], buckets: list[dict], items: dict) -> None:
    """The same update, plus the sorted power-iteration refresh (§4) of every item whose step is due."""
    _step(plans, buckets, items, refresh=True)
