"""The stacked math: SOAP for whole buckets of same-shaped parameters at once, as pure tensor functions.

`step` has no Python side effects and no data-dependent control flow, so for a given plan it compiles to one graph
(on CUDA: one graph replay per optimizer step). Its inputs are stacked per bucket (`BucketTensors`), so the graph
grows with the number of buckets, not of parameters. `initial_entry` runs eagerly, once per parameter: it needs
eigh, which syncs with the host and cannot be captured.

Unlike the reference, M is rotated only when the basis changes (at a refresh) instead of a round trip through the
same basis every step: the same mathematics (docs/spec.md §3.10), 3 instead of 5 matmul units per plain step.
Section numbers (§N, trap N) refer to docs/spec.md.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import orthogonalization
from .planning import BucketPlan, Layout, merge, to_merged, unmerge


class Hyper(NamedTuple):
    """Per param group hyperparameters, float64 [G] device tensors written by the optimizer shell."""

    lr: Tensor
    beta1: Tensor
    beta2: Tensor
    eps: Tensor
    weight_decay: Tensor
    correct_bias: Tensor  # 1.0 or 0.0
    normalize_grads: Tensor  # 1.0 or 0.0


class BucketTensors(NamedTuple):
    """One bucket's state, stacked over its B parameters. Every tensor is static: same address at every step."""

    params: Tensor  # [B, *shape], parameter dtype: copied in before the graph, out after it
    grads: Tensor  # [B, *shape], parameter dtype: this step's gradients, copied in
    has_grad: Tensor  # [B] bool: which items had a gradient this call (written by the host when it changes)
    exp_avg: Tensor  # [B, *merged_shape] M, in the current eigenbasis
    exp_avg_sq: Tensor  # [B, *merged_shape] V, in the current eigenbasis (only ever permuted)
    factors: tuple[Optional[Tensor], ...]  # per merged axis: [B, d, d], or None (identity on that axis)
    eigenbases: tuple[Optional[Tensor], ...]  # per merged axis: [B, d, d], or None
    step: Tensor  # [B] int64: real (finite) updates, for the bias correction (§3.5)
    refresh_clock: Tensor  # [B] int64: calls with a gradient since initialisation (§8)
    skipped: Tensor  # [B] int64: calls skipped for a non-finite gradient
    frequency: Tensor  # [B] int64: refresh period, frozen at the first step
    shampoo_beta: Tensor  # [B] float64: factor EMA, frozen at the first step
    group: Tensor  # [B] int64: row of each item's param group in `Hyper`


def _per_item(v: Tensor, like: Tensor) -> Tensor:
    """Broadcast a [B] vector against a [B, ...] tensor."""
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1)))


def _item_shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape[1:])


def _flat(x: Tensor) -> Tensor:
    """[B, ...] -> [B, n], also for 0-dim and empty items."""
    return x.reshape(x.shape[0], math.prod(_item_shape(x)))


def gram(x: Tensor, axis: int) -> Tensor:
    """Mode-`axis` Gram matrix of each item: contract every other axis with itself (§5). [B, d, d]."""
    d = x.shape[axis + 1]
    rest = math.prod(_item_shape(x)) // d if d else 0  # explicit sizes: reshape(-1) fails on empty tensors
    xa = x.movedim(axis + 1, 1).reshape(x.shape[0], d, rest)
    return xa @ xa.transpose(1, 2)


def _along_axis(x: Tensor, q: Tensor, axis: int) -> Tensor:
    """y[..., j, ...] = sum_i x[..., i, ...] q[i, j] along `axis` of each item."""
    xm = x.movedim(axis + 1, -1)
    d = xm.shape[-1]
    rest = math.prod(xm.shape[1:-1])
    y = (xm.reshape(x.shape[0], rest, d) @ q).reshape(xm.shape)
    return y.movedim(-1, axis + 1)


def project(x: Tensor, eigenbases) -> Tensor:
    """Into the eigenbasis: Q_k^T along every axis k that has one (2-D: Q_L^T X Q_R)."""
    for axis, q in enumerate(eigenbases):
        if q is not None:
            x = _along_axis(x, q, axis)
    return x


def project_back(x: Tensor, eigenbases) -> Tensor:
    """Out of the eigenbasis: Q_k along every axis k that has one (2-D: Q_L X Q_R^T)."""
    for axis, q in enumerate(eigenbases):
        if q is not None:
            x = _along_axis(x, q.transpose(1, 2), axis)
    return x


# ---------------------------------------------------------------------------------------------------- first call


def _eigenbasis(factor: Tensor) -> Tensor:
    """Eigenvectors of one factor by descending eigenvalue (§3 I2), retried in fp64 if eigh fails, as the paper.
    Column-major, as eigh and QR return them (and as the reference holds them): see `state.column_major`."""
    eye = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    try:
        _, q = torch.linalg.eigh(factor + 1e-30 * eye)
    except RuntimeError:
        _, q = torch.linalg.eigh(factor.double() + 1e-30 * eye.double())
        q = q.to(factor.dtype)
    return q.flip(-1)


def initial_entry(grad: Tensor, layout: Layout, state_dtype: torch.dtype, shampoo_beta: float, frequency: int) -> dict:
    """A parameter's first call (§3 I1-I3): its factors and eigenbases, in the checkpoint's entry layout.

    Computed from the parameter's own gradient with the paper's operations (tensordot over the other axes, lerp
    from zero, eigh), so the initial basis is exactly the reference's even where the factor is rank deficient and
    its null-space eigenvectors are decided by rounding (trap 7). Eager, once per parameter.
    """
    g = grad.to(state_dtype)
    if layout.merged_shape != layout.shape or layout.channels_last:
        g = to_merged(g.unsqueeze(0), layout)[0]
    factors, bases = [], []
    for axis, size in enumerate(layout.factor_sizes):
        if size is None:
            factors.append(None)
            bases.append(None)
            continue
        others = [a for a in range(g.dim()) if a != axis]
        f = torch.zeros(size, size, dtype=state_dtype, device=g.device)
        f.lerp_(torch.tensordot(g, g, dims=[others, others]), 1 - shampoo_beta)
        factors.append(f)
        bases.append(_eigenbasis(f))
    zeros = torch.zeros(layout.shape, dtype=state_dtype, device=g.device)
    return {"step": 0, "exp_avg": zeros, "exp_avg_sq": zeros.clone(), "GG": factors, "Q": bases,
            "shampoo_beta": float(shampoo_beta), "precondition_frequency": int(frequency), "skipped": 0,
            "refresh_clock": 0}


# ---------------------------------------------------------------------------------------------------- later calls


def bucket_step(b: BucketTensors, hyper: Hyper, *, channels_last: bool, refresh: bool, method: str) -> None:
    """One bucket's update (§3, later calls), and with `refresh` the refresh (§4) of its items that are due (§8).

    Every size is read from the tensors (none from the plan), so one trace with symbolic sizes serves every bucket
    of a kind (`kinds.KindCompiler`); under a static compile the sizes are constants as before."""
    sdtype = b.exp_avg.dtype
    rows = lambda h: h.index_select(0, b.group)  # noqa: E731  [G] -> [B], float64
    lr, beta1, beta2, eps = rows(hyper.lr), rows(hyper.beta1), rows(hyper.beta2), rows(hyper.eps)
    weight_decay = rows(hyper.weight_decay)
    as_state = lambda v, like: _per_item(v.to(sdtype), like)  # noqa: E731

    grad = merge(b.grads, b.exp_avg.shape[1:], channels_last).to(sdtype)  # sizes off tensors: symbolic per kind
    finite = _flat(torch.isfinite(grad)).all(dim=1)
    active = b.has_grad & finite
    # A skipped item's gradient is replaced by zeros so that nothing below can produce NaN (QR, sort), and every
    # result of a skipped item is then discarded with torch.where: its state stays bit-identical.
    grad = torch.where(_per_item(active, grad), grad, torch.zeros_like(grad))
    step = b.step + active.long()
    clock = b.refresh_clock + b.has_grad.long()  # §8: counts skipped calls too, so the host knows it exactly

    # §3.1-3.4: project, then the moments (multiply then add) and the denominator.
    m_old, v_old = b.exp_avg, b.exp_avg_sq
    g_proj = project(grad, b.eigenbases)
    m = m_old * as_state(beta1, m_old) + g_proj * as_state(1 - beta1, m_old)
    v = v_old * as_state(beta2, v_old) + g_proj.square() * as_state(1 - beta2, v_old)
    denom = v.sqrt() + as_state(eps, v)

    # §3.5: bias correction folded into the step size, in float64 like the reference's Python scalars.
    t = step.clamp(min=1).to(torch.float64)
    corrected = lr * (1 - beta2**t).sqrt() / (1 - beta1**t)
    step_size = torch.where(rows(hyper.correct_bias) > 0, corrected, lr)

    # §3.6-3.7: back to parameter space, optional unit-RMS normalisation.
    update = project_back(m / denom, b.eigenbases)
    rms = _flat(update.square()).mean(dim=1).sqrt()
    normalized = update / _per_item(1e-30 + rms, update)
    update = torch.where(_per_item(rows(hyper.normalize_grads) > 0, update), normalized, update)
    update = unmerge(update, b.params.shape[1:], channels_last)

    # §3.8-3.9 / trap 5: W -= eta U, then decoupled weight decay on the new W with the plain lr, only when > 0.
    # The parameter dtype is rounded after each of the two updates, as the reference's two in-place adds do.
    p = b.params
    w = (p.to(sdtype) + as_state(-step_size, update) * update).to(p.dtype)
    wd = w.to(sdtype)
    decayed = (wd + as_state(-lr * weight_decay, wd) * wd).to(p.dtype)
    w = torch.where(_per_item(weight_decay > 0, w), decayed, w)
    p.copy_(torch.where(_per_item(active, w), w, p))

    # §3.10b / trap 2: the factors see the gradient only after it was used.
    lerp_weight = (1 - b.shampoo_beta).to(sdtype).reshape(-1, 1, 1)
    new_factors = []
    for axis, f in enumerate(b.factors):
        if f is None:
            new_factors.append(None)
            continue
        updated = torch.lerp(f, gram(grad, axis), lerp_weight)
        new_factors.append(torch.where(_per_item(active, f), updated, f))

    if refresh:
        due = active & (clock % b.frequency == 0)
        m, v, new_bases = _refresh(b, due, m, v, new_factors, method)
        for q, q_new in zip(b.eigenbases, new_bases):
            if q is not None:
                q.copy_(q_new)

    m_old.copy_(torch.where(_per_item(active, m), m, m_old))
    v_old.copy_(torch.where(_per_item(active, v), v, v_old))
    for f, f_new in zip(b.factors, new_factors):
        if f is not None:
            f.copy_(f_new)
    b.step.copy_(step)
    b.refresh_clock.copy_(clock)
    b.skipped.copy_(b.skipped + (b.has_grad & ~finite).long())  # elementwise: no accumulate op in the graph


def _refresh(b: BucketTensors, due: Tensor, m: Tensor, v: Tensor, factors: list, method: str):
    """§4 for the items that are due; the others keep M, V and Q."""
    new_bases = []
    v_sorted = v
    for axis, (f, q) in enumerate(zip(factors, b.eigenbases)):
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
        # One power-iteration step: F (Q[:, order]) = P[:, order], orthonormalised (§4.4).
        q_new = orthogonalization.orthogonalize(torch.gather(p, 2, order.unsqueeze(1).expand_as(p)), method)
        new_bases.append(torch.where(_per_item(due, q), q_new, q))
    # M follows the change of basis (the seed PR's bug was to skip this on one path): out with the old, in with the new.
    m_rotated = project(project_back(m, b.eigenbases), new_bases)
    m = torch.where(_per_item(due, m), m_rotated, m)
    v = torch.where(_per_item(due, v), v_sorted, v)
    return m, v, new_bases


def bucket_calls(plans: tuple[BucketPlan, ...], buckets: tuple[BucketTensors, ...], hyper: Hyper,
                 refreshing: tuple[bool, ...], method: str) -> list[tuple[dict, tuple]]:
    """`step` as calls of `bucket_step`, one per bucket: (static keyword arguments, tensor arguments)."""
    return [({"channels_last": plan.layout.channels_last, "refresh": refresh, "method": method}, (b, hyper))
            for plan, b, refresh in zip(plans, buckets, refreshing)]


def step(plans: tuple[BucketPlan, ...], buckets: tuple[BucketTensors, ...], hyper: Hyper,
         refreshing: tuple[bool, ...], method: str) -> None:
    """One SOAP update (§3, later calls) of every bucket; the buckets flagged in `refreshing` also run the sorted
    power-iteration refresh (§4) for their items that are due (§8). All updates in place; returns nothing."""
    for kwargs, args in bucket_calls(plans, buckets, hyper, refreshing, method):
        bucket_step(*args, **kwargs)
