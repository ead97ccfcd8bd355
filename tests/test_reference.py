"""CPU tests of the eager reference optimizer `compiled_soap.SOAP` against docs/spec.md.

Every expected value below is computed independently in this file (explicit einsum / matmuls in float64, or a small
numpy re-implementation of the spec). Only the optimizer's public surface is used: the constructor, `step()`,
`optimizer.state[p]` and `state_dict()` / `load_state_dict()`.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from compiled_soap import SOAP

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------------- helpers


def randn(shape, seed, dtype=F64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64).mul_(scale).to(dtype)


def make_param(shape, seed=1234, dtype=F64):
    return torch.nn.Parameter(randn(shape, seed, dtype))


def set_grad(p, g):
    p.grad = None if g is None else g.to(p.dtype).clone()


def sizes_of(factors):
    """Factor side length per (merged) axis, None where an axis has no factor."""
    return [None if f is None else f.shape[0] for f in factors]


def clone_list(mats):
    return [None if m is None else m.detach().clone() for m in mats]


def to_view(x, view_shape, channels_last=False):
    """The tensor as the optimizer factors it (spec §5): NHWC -> NCHW for channels_last, then reshape."""
    if channels_last:
        x = x.permute(0, 3, 1, 2)
    return x.reshape(view_shape)


def from_view(x, shape, channels_last=False):
    if channels_last:
        n, h, w, c = shape
        return x.reshape(n, c, h, w).permute(0, 2, 3, 1)
    return x.reshape(shape)


_IN, _OUT = "abcdefg", "pqrstuv"


def project_by_hand(x, qs, back=False):
    """project: Y[i,j,..] = sum X[a,b,..] Q0[a,i] Q1[b,j] ..; back: the same with Qk[i,a] (identity where None)."""
    n = x.dim()
    assert len(qs) == n
    mats, subs = [], []
    for k, q in enumerate(qs):
        mats.append(torch.eye(x.shape[k], dtype=x.dtype) if q is None else q)
        subs.append(_OUT[k] + _IN[k] if back else _IN[k] + _OUT[k])
    return torch.einsum(_IN[:n] + "," + ",".join(subs) + "->" + _OUT[:n], x, *mats)


def gram(x, k):
    """Mode-k Gram matrix: unfold along axis k and multiply by the transpose (contracts every other axis)."""
    a = x.movedim(k, 0).reshape(x.shape[k], -1)
    return a @ a.T


# (id, shape, constructor kwargs, shape the optimizer factors, expected factor sizes, channels_last)
PROJECTION_CASES = [
    ("2d", (5, 4), {}, (5, 4), [5, 4], False),
    ("3d", (3, 4, 5), {}, (3, 4, 5), [3, 4, 5], False),
    ("4d", (2, 3, 4, 3), {}, (2, 3, 4, 3), [2, 3, 4, 3], False),
    ("3d-skip-first", (7, 3, 4), dict(max_precond_dim=5), (7, 3, 4), [None, 3, 4], False),
    ("4d-skip-middle", (3, 6, 2, 4), dict(max_precond_dim=5), (3, 6, 2, 4), [3, None, 2, 4], False),
    ("4d-merge-max8", (4, 3, 3, 2), dict(merge_dims=True, max_precond_dim=8), (4, 3, 6), [4, 3, 6], False),
    ("4d-merge-to-one", (4, 3, 3, 2), dict(merge_dims=True), (72,), [72], False),
    ("4d-merge-channels-last", (2, 5, 5, 3),
     dict(merge_dims=True, max_precond_dim=10, data_format="channels_last"), (6, 5, 5), [6, 5, 5], True),
    ("3d-merge-and-skip", (3, 4, 20), dict(merge_dims=True, max_precond_dim=12), (12, 20), [12, None], False),
    ("1d-precondition_1d", (6,), dict(precondition_1d=True), (6,), [6], False),
]


# ----------------------------------------------------------------------------------------------------- projections


@pytest.mark.parametrize("case", PROJECTION_CASES, ids=[c[0] for c in PROJECTION_CASES])
def test_projection_and_update_match_explicit_einsum(case):
    """Moments live in the eigenbasis: V and M follow Q^T G Q (by hand), and the update is -eta * Q (M/denom) Q^T."""
    _, shape, kw, view_shape, sizes, cl = case
    lr, b1, b2, eps = 0.1, 0.8, 0.9, 1e-3
    p = make_param(shape)
    opt = SOAP([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=0.0, precondition_frequency=100, **kw)
    st = opt.state[p]
    set_grad(p, randn(shape, 0))
    opt.step()
    assert sizes_of(st["GG"]) == sizes
    assert sizes_of(st["Q"]) == sizes
    assert st["exp_avg"].shape == p.shape and st["exp_avg_sq"].shape == p.shape

    for call in range(2, 5):
        g = randn(shape, call)
        qs = clone_list(st["Q"])
        m_old = to_view(st["exp_avg"].clone(), view_shape, cl)
        v_old = to_view(st["exp_avg_sq"].clone(), view_shape, cl)
        w_old = p.detach().clone()
        t = call - 1
        set_grad(p, g)
        opt.step()

        gp = project_by_hand(to_view(g, view_shape, cl), qs)
        m_new = b1 * m_old + (1 - b1) * gp
        v_new = b2 * v_old + (1 - b2) * gp * gp
        assert st["step"] == t
        # No refresh (f=100): Q is unchanged, so the stored moments are exactly these (M up to the round trip).
        torch.testing.assert_close(st["exp_avg_sq"], from_view(v_new, shape, cl), **TOL)
        torch.testing.assert_close(st["exp_avg"], from_view(m_new, shape, cl), **TOL)
        eta = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        update = from_view(project_by_hand(m_new / (v_new.sqrt() + eps), qs, back=True), shape, cl)
        torch.testing.assert_close(p.detach(), w_old - eta * update, **TOL)


@pytest.mark.parametrize("shampoo_beta", [0.6, -1.0])
@pytest.mark.parametrize("case", PROJECTION_CASES, ids=[c[0] for c in PROJECTION_CASES])
def test_factor_update_is_ema_of_mode_gram(case, shampoo_beta):
    """GG_k <- sb*GG_k + (1-sb)*Gram_k(G), starting from zero; a negative shampoo_beta means betas[1]."""
    _, shape, kw, view_shape, sizes, cl = case
    betas = (0.9, 0.7)
    sb = shampoo_beta if shampoo_beta >= 0 else betas[1]
    p = make_param(shape)
    opt = SOAP([p], betas=betas, shampoo_beta=shampoo_beta, precondition_frequency=100, **kw)
    st = opt.state[p]
    expected = [None if s is None else torch.zeros(s, s, dtype=F64) for s in sizes]
    for call in range(1, 4):
        g = to_view(randn(shape, 10 + call), view_shape, cl)
        set_grad(p, from_view(g, shape, cl))
        opt.step()
        assert st["shampoo_beta"] == pytest.approx(sb)
        for k, s in enumerate(sizes):
            if s is None:
                assert st["GG"][k] is None
                continue
            expected[k] = sb * expected[k] + (1 - sb) * gram(g, k)
            torch.testing.assert_close(st["GG"][k], expected[k], **TOL)


# ----------------------------------------------------------------------------------------------------- merge_dims table


MERGE_TABLE = [
    # (shape, extra kwargs, factor sizes); spec §5. None: the axis is longer than max_precond_dim.
    ((4, 3, 3, 2), {}, [72]),
    # The spec rows (64,3,3,3)->[1728] and (512,256,3,3)->[512,2304] need 1728^2 / 2304^2 eigh calls, which take
    # seconds to a minute on a busy CPU; these rows exercise the same branches of the rule with small factors.
    ((8, 3, 3, 3), {}, [216]),  # everything fits: one merged axis
    ((32, 16, 3, 3), dict(max_precond_dim=200), [32, 144]),  # c*s > max with c > 1: emit c, restart at s
    ((20000, 3), {}, [None, 3]),
    ((1, 6), {}, [6]),
    ((1, 1), {}, [1]),
    ((16, 16), {}, [256]),  # the "small 2-D layer merges into one axis" note, smaller than 64x64
    ((4, 3, 3, 2), dict(max_precond_dim=8), [4, 3, 6]),
    ((8, 1, 1, 8), dict(max_precond_dim=8), [8, 8]),
    ((2, 5, 5, 3), dict(max_precond_dim=10, data_format="channels_last"), [6, 5, 5]),
    ((2, 5, 5, 3), dict(max_precond_dim=10), [10, 5, 3]),  # same tensor, channels_first: the permutation matters
]


@pytest.mark.parametrize("shape,kw,expected", MERGE_TABLE, ids=[f"{s}-{kw}" for s, kw, _ in MERGE_TABLE])
def test_merge_dims_table(shape, kw, expected):
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = SOAP([p], merge_dims=True, **kw)
    p.grad = randn(shape, 3, dtype=torch.float32)
    opt.step()
    st = opt.state[p]
    assert sizes_of(st["GG"]) == expected
    assert sizes_of(st["Q"]) == expected
    for f in st["GG"] + st["Q"]:
        assert f is None or f.shape[0] == f.shape[1]


def test_without_merge_dims_every_axis_gets_its_own_factor():
    p = torch.nn.Parameter(torch.zeros(4, 3, 3, 2))
    opt = SOAP([p], max_precond_dim=3)
    p.grad = randn(p.shape, 4, dtype=torch.float32)
    opt.step()
    assert sizes_of(opt.state[p]["GG"]) == [None, 3, 3, 2]


# ----------------------------------------------------------------------------------------------------- eigenbasis


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 1e-4)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", [(5, 4), (3, 4, 5), (6,)], ids=["2d", "3d", "1d"])
def test_initial_eigenbasis_orthogonal_sorted_and_diagonalising(shape, dtype, tol):
    p = make_param(shape, dtype=dtype)
    opt = SOAP([p], precondition_1d=True)
    set_grad(p, randn(shape, 5, dtype))
    opt.step()
    st = opt.state[p]
    for f, q in zip(st["GG"], st["Q"]):
        f, q = f.double(), q.double()
        n = f.shape[0]
        scale = f.abs().max().item()
        torch.testing.assert_close(q.T @ q, torch.eye(n, dtype=F64), rtol=0, atol=tol)
        d = q.T @ f @ q
        off = d - torch.diag(torch.diag(d))
        assert off.abs().max().item() <= tol * scale
        lam = torch.diag(d)
        assert bool((lam[:-1] >= lam[1:] - tol * scale).all()), lam
        ref = np.sort(np.linalg.eigvalsh(f.numpy()))[::-1]
        np.testing.assert_allclose(lam.numpy(), ref, rtol=0, atol=tol * scale)


# ----------------------------------------------------------------------------------------------------- refresh


REFRESH_CASES = [
    ("3d", (4, 5, 3), {}, (4, 5, 3), False),
    ("4d-merge", (4, 3, 3, 2), dict(merge_dims=True, max_precond_dim=8), (4, 3, 6), False),
    ("2d-skip", (12, 5), dict(max_precond_dim=10), (12, 5), False),
]


@pytest.mark.parametrize("case", REFRESH_CASES, ids=[c[0] for c in REFRESH_CASES])
def test_refresh_permutes_v_and_does_one_sorted_power_iteration(case):
    _, shape, kw, view_shape, cl = case
    lr, b1, b2, eps, sb, f = 0.05, 0.9, 0.95, 1e-8, 0.1, 2
    p = make_param(shape)
    opt = SOAP([p], lr=lr, betas=(b1, b2), eps=eps, shampoo_beta=sb, weight_decay=0.0,
               precondition_frequency=f, **kw)
    st = opt.state[p]
    for call in (1, 2):
        set_grad(p, randn(shape, 20 + call))
        opt.step()
    # Call 3 is the first refresh (t = 2 = f). Capture the state right before it.
    q_old, gg_old = clone_list(st["Q"]), clone_list(st["GG"])
    m_old = to_view(st["exp_avg"].clone(), view_shape, cl)
    v_old = to_view(st["exp_avg_sq"].clone(), view_shape, cl)
    w_old = p.detach().clone()
    g = randn(shape, 23)
    set_grad(p, g)
    opt.step()
    assert st["step"] == 2

    gv = to_view(g, view_shape, cl)
    gp = project_by_hand(gv, q_old)
    m_pre = b1 * m_old + (1 - b1) * gp
    v_pre = b2 * v_old + (1 - b2) * gp * gp
    eta = lr * math.sqrt(1 - b2**2) / (1 - b1**2)
    # The parameter update of the refresh call still uses the old basis.
    update = from_view(project_by_hand(m_pre / (v_pre.sqrt() + eps), q_old, back=True), shape, cl)
    torch.testing.assert_close(p.detach(), w_old - eta * update, **TOL)

    v_expected = v_pre
    permuted_somewhere = False
    for k, (gg, q) in enumerate(zip(gg_old, q_old)):
        if gg is None:
            assert st["Q"][k] is None and st["GG"][k] is None
            continue
        gg_new = sb * gg + (1 - sb) * gram(gv, k)
        torch.testing.assert_close(st["GG"][k], gg_new, **TOL)
        lam = torch.diag(q.T @ gg_new @ q).numpy()
        idx = np.argsort(-lam, kind="stable")
        gaps = np.diff(np.sort(lam))
        assert gaps.min() > 1e-6 * np.abs(lam).max()  # no ties: the order is well defined
        permuted_somewhere |= not np.array_equal(idx, np.arange(len(idx)))
        v_expected = v_expected.index_select(k, torch.from_numpy(idx))
        q_np, _ = np.linalg.qr(gg_new.numpy() @ q.numpy()[:, idx])
        q_new = st["Q"][k]
        signs = np.sign(np.diag(q_new.numpy().T @ q_np))
        np.testing.assert_allclose(q_new.numpy() * signs, q_np, rtol=0, atol=1e-10)
    assert permuted_somewhere, "test data should make the sort a non-trivial permutation"
    torch.testing.assert_close(st["exp_avg_sq"], from_view(v_expected, shape, cl), **TOL)
    # M follows the change of basis: back with the old Q, into the new one.
    m_expected = project_by_hand(project_by_hand(m_pre, q_old, back=True), clone_list(st["Q"]))
    torch.testing.assert_close(st["exp_avg"], from_view(m_expected, shape, cl), **TOL)


def test_refresh_schedule_and_frozen_hyperparameters():
    """Refreshes at calls f+1, 2f+1, ...; f and shampoo_beta are frozen at the parameter's first step."""
    f = 3
    p = make_param((3, 4))
    opt = SOAP([p], precondition_frequency=f, shampoo_beta=0.9)
    st = opt.state[p]
    set_grad(p, randn((3, 4), 100))
    opt.step()
    assert st["step"] == 0 and st["precondition_frequency"] == 3 and st["shampoo_beta"] == pytest.approx(0.9)
    # Changing the group now must not affect this parameter.
    opt.param_groups[0]["precondition_frequency"] = 2
    opt.param_groups[0]["shampoo_beta"] = 0.5
    refreshed = []
    for call in range(2, 15):
        q_before, gg_before = clone_list(st["Q"]), clone_list(st["GG"])
        g = randn((3, 4), 100 + call)
        set_grad(p, g)
        opt.step()
        assert st["step"] == call - 1
        assert st["refresh_clock"] == call - 1  # no skipped call: the refresh clock is the step (spec §8)
        torch.testing.assert_close(st["GG"][0], 0.9 * gg_before[0] + 0.1 * g @ g.T, **TOL)
        changed = [not torch.equal(a, b) for a, b in zip(q_before, st["Q"])]
        assert changed[0] == changed[1]
        if changed[0]:
            refreshed.append(call)
    assert refreshed == [4, 7, 10, 13]
    assert st["precondition_frequency"] == 3


def test_refresh_after_a_skipped_call_follows_the_clock_with_the_real_step():
    """Spec §8 by hand, f=2: call 1 initialises; call 2 updates (clock 1, t=1); call 3 has a NaN (clock 2: skipped,
    so no refresh); call 4 updates (clock 3, t=2: no refresh, although t is a multiple of f, where the paper's rule
    would refresh); call 5 updates with bias correction t=3 and refreshes (clock 4)."""
    lr, b1, b2, eps, sb, f = 0.05, 0.9, 0.95, 1e-8, 0.1, 2
    shape = (4, 3)
    p = make_param(shape)
    opt = SOAP([p], lr=lr, betas=(b1, b2), eps=eps, shampoo_beta=sb, weight_decay=0.0, precondition_frequency=f)
    st = opt.state[p]
    for call in (1, 2, 3, 4):
        g = randn(shape, 40 + call)
        if call == 3:
            g[0, 0] = float("nan")
        q_before = clone_list(st["Q"]) if "Q" in st else None
        set_grad(p, g)
        opt.step()
        if q_before is not None:
            assert all(torch.equal(a, b) for a, b in zip(q_before, st["Q"])), f"refresh at call {call}"
    assert (st["step"], st["refresh_clock"], st["skipped"]) == (2, 3, 1)

    q_old, gg_old = clone_list(st["Q"]), clone_list(st["GG"])
    m_old, v_old, w_old = st["exp_avg"].clone(), st["exp_avg_sq"].clone(), p.detach().clone()
    g = randn(shape, 45)
    set_grad(p, g)
    opt.step()
    assert (st["step"], st["refresh_clock"]) == (3, 4)

    t = 3
    gp = project_by_hand(g, q_old)
    m_pre = b1 * m_old + (1 - b1) * gp
    v_pre = b2 * v_old + (1 - b2) * gp * gp
    eta = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
    update = project_by_hand(m_pre / (v_pre.sqrt() + eps), q_old, back=True)
    torch.testing.assert_close(p.detach(), w_old - eta * update, **TOL)
    v_expected = v_pre
    for k, (gg, q) in enumerate(zip(gg_old, q_old)):
        gg_new = sb * gg + (1 - sb) * gram(g, k)
        torch.testing.assert_close(st["GG"][k], gg_new, **TOL)
        lam = torch.diag(q.T @ gg_new @ q).numpy()
        assert np.diff(np.sort(lam)).min() > 1e-6 * np.abs(lam).max()  # a well-defined order
        idx = np.argsort(-lam, kind="stable")
        v_expected = v_expected.index_select(k, torch.from_numpy(idx))
        q_np, _ = np.linalg.qr(gg_new.numpy() @ q.numpy()[:, idx])
        q_new = st["Q"][k].numpy()
        np.testing.assert_allclose(q_new * np.sign(np.diag(q_new.T @ q_np)), q_np, rtol=0, atol=1e-10)
        assert not np.allclose(np.abs(q_new), np.abs(q.numpy()), atol=1e-6)  # the basis did move
    torch.testing.assert_close(st["exp_avg_sq"], v_expected, **TOL)
    m_expected = project_by_hand(project_by_hand(m_pre, q_old, back=True), clone_list(st["Q"]))
    torch.testing.assert_close(st["exp_avg"], m_expected, **TOL)


# ----------------------------------------------------------------------------------------------------- first call


def test_first_call_leaves_parameter_bit_identical_even_with_weight_decay():
    p = make_param((4, 3))
    before = p.detach().clone()
    opt = SOAP([p], lr=0.1, weight_decay=0.5)
    set_grad(p, randn((4, 3), 7))
    opt.step()
    assert torch.equal(p.detach(), before)
    st = opt.state[p]
    assert st["step"] == 0
    assert torch.count_nonzero(st["exp_avg"]) == 0 and torch.count_nonzero(st["exp_avg_sq"]) == 0
    set_grad(p, randn((4, 3), 8))
    opt.step()
    assert not torch.equal(p.detach(), before)
    assert st["step"] == 1


def test_late_gradient_skips_its_own_first_call_and_none_grad_is_untouched():
    a, b = make_param((3, 2), 1), make_param((2, 4), 2)
    opt = SOAP([a, b], lr=0.1, weight_decay=0.3)
    for call in range(1, 6):
        a_before, b_before = a.detach().clone(), b.detach().clone()
        set_grad(a, randn(a.shape, 30 + call) if call != 5 else None)
        set_grad(b, randn(b.shape, 40 + call) if call >= 3 else None)
        opt.step()
        if call <= 2:
            assert b not in opt.state or not opt.state[b]
            assert torch.equal(b.detach(), b_before)
        elif call == 3:  # b's first gradient: init only
            assert torch.equal(b.detach(), b_before)
            assert opt.state[b]["step"] == 0
        else:
            assert not torch.equal(b.detach(), b_before)
            assert opt.state[b]["step"] == call - 3
        if call == 1:
            assert torch.equal(a.detach(), a_before)
        elif call == 5:  # no gradient: no update, no weight decay, no state change
            assert torch.equal(a.detach(), a_before)
            assert opt.state[a]["step"] == 3
        else:
            assert not torch.equal(a.detach(), a_before)
            assert opt.state[a]["step"] == call - 1


# ----------------------------------------------------------------------------------------------------- plain Adam path


@pytest.mark.parametrize("correct_bias", [True, False])
@pytest.mark.parametrize(
    "shape,kw",
    [((7,), {}), ((), {}), ((12,), dict(precondition_1d=True, max_precond_dim=10))],
    ids=["1d", "0d", "1d-too-long-for-precondition_1d"],
)
def test_1d_param_is_hf_style_adam(shape, kw, correct_bias):
    lr, b1, b2, eps, wd = 0.05, 0.9, 0.99, 1e-2, 0.02
    p = make_param(shape)
    opt = SOAP([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, correct_bias=correct_bias, **kw)
    w = p.detach().numpy().copy()
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    t = 0
    for call in range(1, 7):
        g = randn(shape, 50 + call, scale=0.02)  # small gradients, so eps placement matters
        set_grad(p, g)
        opt.step()
        g = g.numpy()
        if call > 1:
            t += 1
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            step = lr * math.sqrt(1 - b2**t) / (1 - b1**t) if correct_bias else lr
            w = w - step * m / (np.sqrt(v) + eps)
            w = w - lr * wd * w
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-12, atol=1e-14)
    st = opt.state[p]
    assert st["step"] == 5
    assert all(f is None for f in st["GG"]) and all(q is None for q in st["Q"])
    np.testing.assert_allclose(st["exp_avg"].numpy(), m, rtol=1e-12, atol=1e-16)
    np.testing.assert_allclose(st["exp_avg_sq"].numpy(), v, rtol=1e-12, atol=1e-18)


def test_step_size_eps_and_weight_decay_order_on_1x1_by_hand():
    lr, b1, b2, eps, wd = 0.1, 0.5, 0.75, 0.25, 0.2
    p = torch.nn.Parameter(torch.tensor([[2.0]], dtype=F64))
    opt = SOAP([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)

    set_grad(p, torch.tensor([[0.5]], dtype=F64))
    opt.step()  # init only
    assert p.item() == 2.0

    set_grad(p, torch.tensor([[-1.0]], dtype=F64))
    opt.step()
    # t=1: m = 0.5*(-1) = -0.5; v = 0.25*1 = 0.25; denom = sqrt(0.25)+0.25 = 0.75
    # eta = 0.1*sqrt(1-0.75)/(1-0.5) = 0.1; w = 2 - 0.1*(-0.5/0.75) = 2 + 1/15; then w *= 1 - 0.1*0.2
    w1 = (2.0 + 1.0 / 15.0) * 0.98
    assert p.item() == pytest.approx(w1, rel=1e-14)
    # The alternatives the spec rules out give visibly different numbers.
    assert abs(2.0 * 0.98 + 1.0 / 15.0 - w1) > 1e-3  # weight decay before the update
    assert abs((2.0 - 0.1 * (-0.5 / 0.5) / (math.sqrt(0.25 / 0.25) + 0.25)) * 0.98 - w1) > 1e-3  # AdamW eps

    set_grad(p, torch.tensor([[2.0]], dtype=F64))
    opt.step()
    # t=2: m = 0.5*(-0.5) + 0.5*2 = 0.75; v = 0.75*0.25 + 0.25*4 = 1.1875
    # eta = 0.1*sqrt(1-0.75^2)/(1-0.5^2) = 0.1*sqrt(0.4375)/0.75; denom = sqrt(1.1875) + 0.25 (eps not corrected)
    eta2 = 0.1 * math.sqrt(0.4375) / 0.75
    w2 = (w1 - eta2 * 0.75 / (math.sqrt(1.1875) + 0.25)) * 0.98
    assert p.item() == pytest.approx(w2, rel=1e-14)
    # torch.optim.AdamW's convention (eps added to the bias-corrected sqrt(v)) would differ:
    adamw = (w1 - 0.1 / 0.75 * 0.75 / (math.sqrt(1.1875 / 0.4375) + 0.25)) * 0.98
    assert abs(adamw - w2) > 1e-4
    st = opt.state[p]
    assert st["exp_avg"].abs().item() == pytest.approx(0.75, rel=1e-14)
    assert st["exp_avg_sq"].item() == pytest.approx(1.1875, rel=1e-14)


# ----------------------------------------------------------------------------------------------------- numpy re-derivation


class NumpySOAP2D:
    """Spec §3-4 for one 2-D parameter, in float64 numpy."""

    def __init__(self, w, lr, betas, shampoo_beta, eps, weight_decay, f, normalize_grads, correct_bias):
        self.w = w.copy()
        self.lr, (self.b1, self.b2), self.eps, self.wd, self.f = lr, betas, eps, weight_decay, f
        self.sb = shampoo_beta if shampoo_beta >= 0 else betas[1]
        self.normalize, self.correct_bias = normalize_grads, correct_bias
        self.t = 0
        self.ql = None

    @staticmethod
    def _eig_desc(a):
        _, q = np.linalg.eigh(a)
        return q[:, ::-1]

    @staticmethod
    def _sorted_power_iteration(a, q):
        lam = np.diag(q.T @ a @ q)
        idx = np.argsort(-lam, kind="stable")
        qn, _ = np.linalg.qr(a @ q[:, idx])
        return qn, idx

    def step(self, g):
        sb = self.sb
        if self.ql is None:
            self.L = (1 - sb) * (g @ g.T)
            self.R = (1 - sb) * (g.T @ g)
            self.ql, self.qr = self._eig_desc(self.L), self._eig_desc(self.R)
            self.m = np.zeros_like(g)
            self.v = np.zeros_like(g)
            return
        ql, qr = self.ql, self.qr
        gp = ql.T @ g @ qr
        self.t += 1
        t = self.t
        self.m = self.b1 * self.m + (1 - self.b1) * gp
        self.v = self.b2 * self.v + (1 - self.b2) * gp * gp
        denom = np.sqrt(self.v) + self.eps
        eta = self.lr * math.sqrt(1 - self.b2**t) / (1 - self.b1**t) if self.correct_bias else self.lr
        u = ql @ (self.m / denom) @ qr.T
        if self.normalize:
            u = u / (1e-30 + math.sqrt(np.mean(u * u)))
        self.w = self.w - eta * u
        if self.wd > 0:
            self.w = self.w - self.lr * self.wd * self.w
        m_orig = ql @ self.m @ qr.T
        self.L = sb * self.L + (1 - sb) * (g @ g.T)
        self.R = sb * self.R + (1 - sb) * (g.T @ g)
        if t % self.f == 0:
            self.ql, idx = self._sorted_power_iteration(self.L, ql)
            self.v = self.v[idx, :]
            self.qr, idx = self._sorted_power_iteration(self.R, qr)
            self.v = self.v[:, idx]
        self.m = self.ql.T @ m_orig @ self.qr


NUMPY_CONFIGS = [
    dict(lr=0.05, betas=(0.95, 0.95), shampoo_beta=-1, eps=1e-8, weight_decay=0.01, normalize_grads=False,
         correct_bias=True),
    dict(lr=0.02, betas=(0.9, 0.99), shampoo_beta=0.6, eps=1e-6, weight_decay=0.1, normalize_grads=True,
         correct_bias=False),
]


@pytest.mark.parametrize("cfg", NUMPY_CONFIGS, ids=["defaults-ish", "normalize-nobias-sb0.6"])
def test_matches_independent_numpy_implementation_fp64(cfg):
    n, f, calls = 5, 3, 11  # refreshes at calls 4, 7, 10
    rng = np.random.default_rng(2024)
    # Full-rank, well-conditioned first gradient (spec trap 7): distinct singular values 3 .. 1.
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    grads = [u @ np.diag(np.linspace(3.0, 1.0, n)) @ v.T] + [rng.standard_normal((n, n)) for _ in range(calls - 1)]
    w0 = rng.standard_normal((n, n))

    p = torch.nn.Parameter(torch.tensor(w0, dtype=F64))
    opt = SOAP([p], precondition_frequency=f, **cfg)
    ref = NumpySOAP2D(w0, f=f, **cfg)
    for g in grads:
        p.grad = torch.tensor(g, dtype=F64)
        opt.step()
        ref.step(g)
        np.testing.assert_allclose(p.detach().numpy(), ref.w, rtol=0, atol=1e-10)
    assert np.abs(ref.w - w0).max() > 1e-2  # the trajectory moved, so agreement means something
    # V is sign-invariant, so it can be compared directly.
    np.testing.assert_allclose(opt.state[p]["exp_avg_sq"].numpy(), ref.v, rtol=1e-8, atol=1e-12)


# ----------------------------------------------------------------------------------------------------- training / dtypes


def test_closure_training_decreases_loss():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x @ torch.randn(4, 1) + 0.5
    model = torch.nn.Linear(4, 1)
    opt = SOAP(model.parameters(), lr=0.05, weight_decay=0.0, precondition_frequency=5)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    losses = []
    for _ in range(60):
        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor)
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses


@pytest.mark.parametrize(
    "dtype,state_dtype",
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.float32),
     (F64, F64)],
    ids=["bf16", "fp16", "fp32", "fp64"],
)
def test_low_and_high_precision_params(dtype, state_dtype):
    w = make_param((4, 3), dtype=dtype)
    b = make_param((3,), dtype=dtype)
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = SOAP([w, b], lr=0.05, precondition_frequency=2)
    for call in range(5):
        set_grad(w, randn((4, 3), 60 + call))
        set_grad(b, randn((3,), 70 + call))
        opt.step()
    for p, p0 in ((w, w0), (b, b0)):
        assert p.dtype == dtype
        assert bool(torch.isfinite(p).all())
        assert not torch.equal(p.detach(), p0)
        st = opt.state[p]
        assert st["step"] == 4
        for key in ("exp_avg", "exp_avg_sq"):
            assert st[key].dtype == state_dtype and bool(torch.isfinite(st[key]).all())
        for m in st["GG"] + st["Q"]:
            assert m is None or (m.dtype == state_dtype and bool(torch.isfinite(m).all()))
    assert [m.dtype for m in opt.state[w]["Q"]] == [state_dtype, state_dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, F64], ids=["bf16", "fp64"])
def test_state_dict_round_trip_continues_identically(dtype):
    def build(params):
        return SOAP(params, lr=0.05, precondition_frequency=3, weight_decay=0.01)

    ps = [make_param((4, 3), 1, dtype), make_param((5,), 2, dtype)]
    opt = build(ps)
    grads = [[randn(p.shape, 80 + 10 * i + c) for i, p in enumerate(ps)] for c in range(8)]
    for c in range(3):
        for p, g in zip(ps, grads[c]):
            set_grad(p, g)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = build(qs)
    opt2.load_state_dict(sd)
    for p, q in zip(ps, qs):
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt2.state[q][key].dtype == opt.state[p][key].dtype
    for c in range(3, 8):  # crosses the refreshes at calls 4 and 7
        for p, q, g in zip(ps, qs, grads[c]):
            set_grad(p, g)
            set_grad(q, g)
        opt.step()
        opt2.step()
        for p, q in zip(ps, qs):
            assert torch.equal(p.detach(), q.detach())


# ----------------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(lr=-1e-3), "lr"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.01), "weight_decay"),
        (dict(betas=(1.0, 0.9)), "betas"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(betas=(-0.1, 0.9)), "betas"),
        (dict(betas=(0.9, 1.5)), "betas"),
        (dict(shampoo_beta=1.0), "shampoo_beta"),
        (dict(shampoo_beta=1.5), "shampoo_beta"),
        (dict(precondition_frequency=0), "precondition_frequency"),
        (dict(precondition_frequency=-3), "precondition_frequency"),
        (dict(max_precond_dim=0), "max_precond_dim"),
        (dict(data_format="NHWC"), "data_format"),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(f"{k}={x}" for k, x in v.items()),
)
def test_invalid_hyperparameters_raise_naming_the_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        SOAP([torch.nn.Parameter(torch.zeros(2, 2))], **kw)
    opt = SOAP([torch.nn.Parameter(torch.zeros(2, 2))])
    with pytest.raises(ValueError, match=name):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], **kw})


def test_boundary_hyperparameters_are_accepted():
    SOAP([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.0, eps=1e-30, weight_decay=0.0, betas=(0.0, 0.0),
         shampoo_beta=0.0, precondition_frequency=1, max_precond_dim=1)


def test_complex_parameter_is_rejected():
    with pytest.raises(Exception, match="complex"):
        SOAP([torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.complex64))])


def test_sparse_gradient_is_rejected():
    p = torch.nn.Parameter(torch.zeros(4, 3))
    opt = SOAP([p])
    p.grad = torch.zeros(4, 3).to_sparse()
    with pytest.raises(Exception, match="sparse"):
        opt.step()
