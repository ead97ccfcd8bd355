"""Direct unit tests of compiled_soap.stacked: gram, project, project_back, initial_entry and step.

The expected values are computed independently in this file: numpy tensordot / einsum per item, hand-worked 2x2
examples, and for `step` an explicit per-item SOAP update in numpy that follows docs/spec.md §3 (later calls), §4
(refresh) and §8 (refresh clock, skipped calls). Eigenbases after a refresh are compared up to the sign of each
column (the spec leaves QR's signs free, §4), with M's rows/columns flipped alongside.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from compiled_soap.planning import BucketPlan, Layout, layout_of
from compiled_soap.stacked import BucketTensors, Hyper, gram, initial_entry, project, project_back, step

F64 = torch.float64


def group(**overrides) -> dict:
    g = {"max_precond_dim": 10000, "merge_dims": False, "precondition_1d": False, "data_format": "channels_first"}
    g.update(overrides)
    return g


def randn(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def random_orthogonal(gen: np.random.Generator, d: int) -> np.ndarray:
    q, _ = np.linalg.qr(gen.standard_normal((d, d)))
    return q


# ------------------------------------------------------------------------------------------------------ gram

GRAM_CASES = [((4, 3), a) for a in range(2)] + [((2, 3, 4), a) for a in range(3)] + \
             [((2, 3, 2, 3), a) for a in range(4)] + [((0, 5), a) for a in range(2)]


@pytest.mark.parametrize("item_shape, axis", GRAM_CASES)
def test_gram_against_per_item_tensordot(item_shape, axis):
    batch = 3
    x = randn(7, batch, *item_shape)
    got = gram(x, axis)
    d = item_shape[axis]
    assert tuple(got.shape) == (batch, d, d)
    others = [a for a in range(len(item_shape)) if a != axis]
    for b in range(batch):
        xb = x[b].numpy()
        expected = np.tensordot(xb, xb, axes=(others, others))
        np.testing.assert_allclose(got[b].numpy(), expected, rtol=1e-12, atol=1e-12)


def test_gram_hand_worked():
    # Item [[1, 2], [0, 1]]: G G^T = [[5, 2], [2, 1]], G^T G = [[1, 2], [2, 5]].
    x = torch.tensor([[[1.0, 2.0], [0.0, 1.0]]], dtype=F64)
    assert torch.equal(gram(x, 0)[0], torch.tensor([[5.0, 2.0], [2.0, 1.0]], dtype=F64))
    assert torch.equal(gram(x, 1)[0], torch.tensor([[1.0, 2.0], [2.0, 5.0]], dtype=F64))


def test_gram_empty_item_is_zero():
    x = torch.zeros(2, 0, 5, dtype=F64)
    assert tuple(gram(x, 0).shape) == (2, 0, 0)
    g1 = gram(x, 1)
    assert tuple(g1.shape) == (2, 5, 5)
    assert torch.equal(g1, torch.zeros(2, 5, 5, dtype=F64))


# -------------------------------------------------------------------------------------- project / project_back

def test_project_2d_against_einsum():
    batch, m, n = 3, 4, 3
    x, ql, qr = randn(1, batch, m, n), randn(2, batch, m, m), randn(3, batch, n, n)  # general, not orthogonal
    expected = torch.einsum("bia,bij,bjc->bac", ql, x, qr)  # Q_L^T X Q_R
    torch.testing.assert_close(project(x, (ql, qr)), expected, rtol=1e-12, atol=1e-12)


def test_project_back_2d_against_einsum():
    batch, m, n = 3, 4, 3
    x, ql, qr = randn(4, batch, m, n), randn(5, batch, m, m), randn(6, batch, n, n)
    expected = torch.einsum("bai,bij,bcj->bac", ql, x, qr)  # Q_L X Q_R^T
    torch.testing.assert_close(project_back(x, (ql, qr)), expected, rtol=1e-12, atol=1e-12)


def test_project_2d_per_item_matrix_products():
    batch, m, n = 2, 3, 5
    x, ql, qr = randn(7, batch, m, n), randn(8, batch, m, m), randn(9, batch, n, n)
    got, back = project(x, (ql, qr)), project_back(x, (ql, qr))
    for b in range(batch):
        L, R, X = ql[b].numpy(), qr[b].numpy(), x[b].numpy()
        np.testing.assert_allclose(got[b].numpy(), L.T @ X @ R, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(back[b].numpy(), L @ X @ R.T, rtol=1e-12, atol=1e-12)


def test_project_3d_with_absent_middle_axis():
    batch = 2
    x, q0, q2 = randn(10, batch, 3, 4, 5), randn(11, batch, 3, 3), randn(12, batch, 5, 5)
    expected = torch.einsum("bijk,bia,bkc->bajc", x, q0, q2)
    expected_back = torch.einsum("bijk,bai,bck->bajc", x, q0, q2)
    torch.testing.assert_close(project(x, (q0, None, q2)), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(project_back(x, (q0, None, q2)), expected_back, rtol=1e-12, atol=1e-12)


def test_project_1d_and_no_factors():
    x, q = randn(13, 3, 4), randn(14, 3, 4, 4)
    torch.testing.assert_close(project(x, (q,)), torch.einsum("bi,bia->ba", x, q), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(project_back(x, (q,)), torch.einsum("bi,bai->ba", x, q), rtol=1e-12, atol=1e-12)
    y = randn(15, 3, 4, 2)
    assert torch.equal(project(y, (None, None)), y)
    assert torch.equal(project_back(y, (None, None)), y)


@pytest.mark.parametrize("item_shape, present", [((4, 3), (True, True)), ((3, 4, 5), (True, False, True)),
                                                 ((2, 3, 2, 3), (True, True, False, True))])
def test_project_back_of_project_is_identity_for_orthogonal_bases(item_shape, present):
    gen = np.random.default_rng(0)
    batch = 3
    bases = tuple(torch.from_numpy(np.stack([random_orthogonal(gen, d) for _ in range(batch)])) if keep else None
                  for d, keep in zip(item_shape, present))
    x = randn(16, batch, *item_shape)
    y = project(x, bases)
    assert not torch.allclose(y, x)  # the rotation really does something
    assert (project_back(y, bases) - x).abs().max().item() < 1e-12
    assert (project(project_back(x, bases), bases) - x).abs().max().item() < 1e-12


# ----------------------------------------------------------------------------------------------- initial_entry

def _check_eigenbasis(factor: np.ndarray, q: np.ndarray):
    """q's columns: orthonormal eigenvectors of factor, by descending eigenvalue."""
    d = factor.shape[0]
    np.testing.assert_allclose(q.T @ q, np.eye(d), atol=1e-12)
    lam = np.einsum("ij,ik,kj->j", q, factor, q)  # q_j^T F q_j
    np.testing.assert_allclose(factor @ q, q * lam, atol=1e-10)
    np.testing.assert_allclose(lam, np.sort(np.linalg.eigvalsh(factor))[::-1], atol=1e-10)
    assert np.all(np.diff(lam) <= 1e-10)


def test_initial_entry_hand_worked_2x2():
    g = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=F64)
    e = initial_entry(g, layout_of((2, 2), group()), F64, 0.5, 7)
    # (1 - 0.5) * G G^T and (1 - 0.5) * G^T G.
    np.testing.assert_allclose(e["GG"][0].numpy(), [[2.5, 1.0], [1.0, 0.5]], rtol=0, atol=1e-15)
    np.testing.assert_allclose(e["GG"][1].numpy(), [[0.5, 1.0], [1.0, 2.5]], rtol=0, atol=1e-15)
    # [[2.5, 1], [1, 0.5]]: trace 3, determinant 1/4, so eigenvalues 3/2 +- sqrt(2); the top eigenvector solves
    # (2.5 - lambda) x + y = 0, i.e. it is along (1, sqrt(2) - 1). The second factor is the same with axes swapped.
    top = np.array([1.0, math.sqrt(2) - 1]) / math.sqrt(1 + (math.sqrt(2) - 1) ** 2)
    bottom = np.array([-top[1], top[0]])
    ql, qr = e["Q"][0].numpy(), e["Q"][1].numpy()
    assert abs(abs(ql[:, 0] @ top) - 1) < 1e-12
    assert abs(abs(ql[:, 1] @ bottom) - 1) < 1e-12
    assert abs(abs(qr[:, 0] @ top[::-1]) - 1) < 1e-12
    assert abs(abs(qr[:, 1] @ bottom[::-1]) - 1) < 1e-12
    assert e["step"] == 0 and e["refresh_clock"] == 0 and e["skipped"] == 0
    assert e["precondition_frequency"] == 7 and e["shampoo_beta"] == 0.5


def test_initial_entry_random_2d():
    g = randn(20, 5, 3)
    beta = 0.8
    e = initial_entry(g, layout_of((5, 3), group()), F64, beta, 10)
    G = g.numpy()
    assert len(e["GG"]) == 2 and len(e["Q"]) == 2
    np.testing.assert_allclose(e["GG"][0].numpy(), (1 - beta) * np.einsum("ij,kj->ik", G, G), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(e["GG"][1].numpy(), (1 - beta) * np.einsum("ji,jk->ik", G, G), rtol=1e-13, atol=1e-14)
    for f, q in zip(e["GG"], e["Q"]):
        assert f.dtype == F64 and q.dtype == F64
        _check_eigenbasis(f.numpy(), q.numpy())
    for key in ("exp_avg", "exp_avg_sq"):
        assert e[key].shape == (5, 3) and e[key].dtype == F64
        assert torch.equal(e[key], torch.zeros(5, 3, dtype=F64))
    assert e["exp_avg"].data_ptr() != e["exp_avg_sq"].data_ptr()  # two buffers, updated separately
    assert e["step"] == 0 and e["refresh_clock"] == 0 and e["skipped"] == 0
    assert e["shampoo_beta"] == beta and e["precondition_frequency"] == 10


def test_initial_entry_eigenbases_are_column_major():
    g = randn(21, 5, 3, 4)
    e = initial_entry(g, layout_of((5, 3, 4), group()), F64, 0.9, 10)
    for q, d in zip(e["Q"], (5, 3, 4)):
        assert q.shape == (d, d)
        assert q.stride() == (1, d)


def test_initial_entry_absent_factor_above_max_precond_dim():
    g = randn(22, 3, 7)
    e = initial_entry(g, layout_of((3, 7), group(max_precond_dim=5)), F64, 0.95, 10)
    assert e["GG"][1] is None and e["Q"][1] is None
    G = g.numpy()
    np.testing.assert_allclose(e["GG"][0].numpy(), 0.05 * G @ G.T, rtol=1e-12, atol=1e-14)
    _check_eigenbasis(e["GG"][0].numpy(), e["Q"][0].numpy())
    assert e["exp_avg"].shape == (3, 7) and e["exp_avg_sq"].shape == (3, 7)


def test_initial_entry_1d_and_16_bit_gradient():
    # A bf16 gradient with a float32 state: the factor is the float32 outer product.
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16)
    e = initial_entry(g, layout_of((3,), group(precondition_1d=True)), torch.float32, 0.5, 10)
    v = np.array([1.0, -2.0, 0.5])
    assert e["GG"][0].dtype == torch.float32 and e["Q"][0].dtype == torch.float32
    np.testing.assert_allclose(e["GG"][0].numpy(), 0.5 * np.outer(v, v), rtol=1e-6)
    assert e["exp_avg"].dtype == torch.float32 and e["exp_avg"].shape == (3,)
    # Rank one: the top eigenvector is v / |v|.
    assert abs(abs(e["Q"][0][:, 0].double().numpy() @ (v / np.linalg.norm(v))) - 1) < 1e-5


def test_initial_entry_channels_last_merged():
    g = randn(23, 2, 2, 2, 3)  # NHWC
    layout = layout_of((2, 2, 2, 3), group(merge_dims=True, max_precond_dim=10, data_format="channels_last"))
    assert tuple(layout.merged_shape) == (6, 4)  # NCHW (2, 3, 2, 2): 2*3 = 6, then 2*2 = 4
    e = initial_entry(g, layout, F64, 0.5, 10)
    gm = g.permute(0, 3, 1, 2).reshape(6, 4).numpy()
    np.testing.assert_allclose(e["GG"][0].numpy(), 0.5 * gm @ gm.T, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(e["GG"][1].numpy(), 0.5 * gm.T @ gm, rtol=1e-12, atol=1e-14)
    assert e["exp_avg"].shape == (2, 2, 2, 3)  # the state keeps the parameter's own shape


# ---------------------------------------------------------------------------------------------------- step

@dataclass
class Item:
    """One parameter's state, as numpy float64 arrays, for the per-item reference."""

    p: np.ndarray
    g: np.ndarray
    has_grad: bool
    m: np.ndarray
    v: np.ndarray
    factors: list
    bases: list
    step: int
    clock: int
    skipped: int
    frequency: int
    shampoo_beta: float
    group: int


def spec_project(x: np.ndarray, bases, back: bool = False) -> np.ndarray:
    """Spec §5's loop: contract the leading axis with Q's rows (project) or columns (back), append at the end."""
    for q in bases:
        if q is None:
            x = np.moveaxis(x, 0, -1)
        else:
            x = np.tensordot(x, q, axes=([0], [1 if back else 0]))
    return x


def reference_step(item: Item, hp: dict, refresh_flag: bool) -> tuple[Item, bool]:
    """Per-item SOAP later call (§3), refresh (§4), clock and skips (§8). Returns (new item, refreshed)."""
    out = copy.deepcopy(item)
    if not item.has_grad:
        return out, False
    out.clock = item.clock + 1
    if not np.all(np.isfinite(item.g)):
        out.skipped = item.skipped + 1
        return out, False
    g = item.g
    b1, b2, eps, lr, wd = hp["beta1"], hp["beta2"], hp["eps"], hp["lr"], hp["weight_decay"]
    g_proj = spec_project(g, item.bases)  # §3.1
    t = item.step + 1  # §3.2
    m = b1 * item.m + (1 - b1) * g_proj  # §3.3
    v = b2 * item.v + (1 - b2) * g_proj * g_proj
    denom = np.sqrt(v) + eps  # §3.4
    eta = lr * math.sqrt(1 - b2**t) / (1 - b1**t) if hp["correct_bias"] else lr  # §3.5
    u = spec_project(m / denom, item.bases, back=True)  # §3.6
    if hp["normalize_grads"]:
        u = u / (1e-30 + np.sqrt(np.mean(u * u)))  # §3.7
    w = item.p - eta * u  # §3.8
    if wd > 0:
        w = w - lr * wd * w  # §3.9
    out.p, out.step, out.m, out.v = w, t, m, v
    # §3.10b: factor EMA with the raw gradient (Gram over all other axes).
    bs = item.shampoo_beta
    factors = []
    for k, f in enumerate(item.factors):
        if f is None:
            factors.append(None)
        else:
            others = [a for a in range(g.ndim) if a != k]
            factors.append(bs * f + (1 - bs) * np.tensordot(g, g, axes=(others, others)))
    out.factors = factors
    refreshed = refresh_flag and out.clock % item.frequency == 0
    if refreshed:  # §4 with the OLD bases and the UPDATED factors
        m_orig = spec_project(m, item.bases, back=True)
        new_bases = []
        for k, (f, q) in enumerate(zip(factors, item.bases)):
            if f is None:
                new_bases.append(None)
                continue
            estimated = np.diag(q.T @ f @ q)
            order = np.argsort(-estimated, kind="stable")
            v = np.take(v, order, axis=k)
            new_bases.append(np.linalg.qr(f @ q[:, order])[0])
        out.v = v
        out.bases = new_bases
        out.m = spec_project(m_orig, new_bases)
    return out, refreshed


def random_item(gen: np.random.Generator, shape, factor_sizes, **fields) -> Item:
    def spd(d):
        a = gen.standard_normal((d, d + 2))
        return a @ a.T / d + 0.1 * np.eye(d)

    item = Item(
        p=gen.standard_normal(shape),
        g=gen.standard_normal(shape) * (1 + np.arange(math.prod(shape)).reshape(shape) % 3),  # uneven scales
        has_grad=True, m=0.3 * gen.standard_normal(shape), v=gen.uniform(0.05, 1.0, shape) ** 2,
        factors=[None if s is None else spd(s) for s in factor_sizes],
        bases=[None if s is None else random_orthogonal(gen, s) for s in factor_sizes],
        step=3, clock=3, skipped=0, frequency=10, shampoo_beta=0.9, group=0)
    for k, val in fields.items():
        setattr(item, k, val)
    return item


def to_bucket(items: list[Item], shape, factor_sizes) -> tuple[BucketPlan, BucketTensors]:
    layout = Layout(tuple(shape), tuple(shape), False, tuple(factor_sizes))
    plan = BucketPlan(layout, F64, F64, len(items))
    stack = lambda xs: torch.from_numpy(np.stack(xs)).clone()  # noqa: E731
    ints = lambda name: torch.tensor([getattr(it, name) for it in items], dtype=torch.int64)  # noqa: E731
    bucket = BucketTensors(
        params=stack([it.p for it in items]), grads=stack([it.g for it in items]),
        has_grad=torch.tensor([it.has_grad for it in items], dtype=torch.bool),
        exp_avg=stack([it.m for it in items]), exp_avg_sq=stack([it.v for it in items]),
        factors=tuple(None if s is None else stack([it.factors[k] for it in items])
                      for k, s in enumerate(factor_sizes)),
        eigenbases=tuple(None if s is None else stack([it.bases[k] for it in items])
                         for k, s in enumerate(factor_sizes)),
        step=ints("step"), refresh_clock=ints("clock"), skipped=ints("skipped"), frequency=ints("frequency"),
        shampoo_beta=torch.tensor([it.shampoo_beta for it in items], dtype=F64), group=ints("group"))
    return plan, bucket


HYPER_FIELDS = ("lr", "beta1", "beta2", "eps", "weight_decay", "correct_bias", "normalize_grads")
BASE_HP = {"lr": 0.02, "beta1": 0.9, "beta2": 0.95, "eps": 0.03, "weight_decay": 0.1, "correct_bias": True,
           "normalize_grads": False}


def to_hyper(rows: list[dict]) -> Hyper:
    return Hyper(*(torch.tensor([float(r[f]) for r in rows], dtype=F64) for f in HYPER_FIELDS))


def clone_bucket(b: BucketTensors) -> BucketTensors:
    c = lambda x: None if x is None else x.clone()  # noqa: E731
    return BucketTensors(*(tuple(c(y) for y in x) if isinstance(x, tuple) else c(x) for x in b))


def check_bucket(b: BucketTensors, before: BucketTensors, items: list[Item], rows: list[dict], refresh_flag: bool):
    """Compare the stepped bucket with the per-item reference; returns the per-item 'refreshed' flags."""
    flags = []
    for i, item in enumerate(items):
        exp, refreshed = reference_step(item, rows[item.group], refresh_flag)
        flags.append(refreshed)
        assert b.step[i].item() == exp.step, f"item {i}: step"
        assert b.refresh_clock[i].item() == exp.clock, f"item {i}: refresh_clock"
        assert b.skipped[i].item() == exp.skipped, f"item {i}: skipped"
        frozen = not item.has_grad or not np.all(np.isfinite(item.g))
        if frozen:  # nothing moves, bit for bit
            assert torch.equal(b.params[i], before.params[i]), f"item {i}: params"
            assert torch.equal(b.exp_avg[i], before.exp_avg[i]), f"item {i}: exp_avg"
            assert torch.equal(b.exp_avg_sq[i], before.exp_avg_sq[i]), f"item {i}: exp_avg_sq"
            for k, (f, f0, q, q0) in enumerate(zip(b.factors, before.factors, b.eigenbases, before.eigenbases)):
                if f is not None:
                    assert torch.equal(f[i], f0[i]), f"item {i}: factor {k}"
                    assert torch.equal(q[i], q0[i]), f"item {i}: eigenbasis {k}"
            continue
        tol = dict(rtol=1e-10, atol=1e-11)
        np.testing.assert_allclose(b.params[i].numpy(), exp.p, **tol, err_msg=f"item {i}: params")
        np.testing.assert_allclose(b.exp_avg_sq[i].numpy(), exp.v, **tol, err_msg=f"item {i}: exp_avg_sq")
        m_expected = exp.m
        for k, (f, q, q0) in enumerate(zip(b.factors, b.eigenbases, before.eigenbases)):
            if f is None:
                assert exp.factors[k] is None and q is None
                continue
            np.testing.assert_allclose(f[i].numpy(), exp.factors[k], **tol, err_msg=f"item {i}: factor {k}")
            if not refreshed:
                assert torch.equal(q[i], q0[i]), f"item {i}: eigenbasis {k} must not change without a refresh"
                continue
            got_q = q[i].numpy()
            signs = np.sign(np.sum(got_q * exp.bases[k], axis=0))  # QR's column signs are free (§4)
            np.testing.assert_allclose(got_q, exp.bases[k] * signs, rtol=1e-9, atol=1e-9,
                                       err_msg=f"item {i}: eigenbasis {k}")
            shape = [1] * m_expected.ndim
            shape[k] = -1
            m_expected = m_expected * signs.reshape(shape)
        np.testing.assert_allclose(b.exp_avg[i].numpy(), m_expected, rtol=1e-9, atol=1e-10,
                                   err_msg=f"item {i}: exp_avg")
    return flags


SHAPE, SIZES = (4, 3), (4, 3)

# Each scenario: refresh flag for the bucket, per-item fields, per-group hyperparameters, and the expected
# per-item refresh flags (a check that the scenario exercises what it claims to).
SCENARIOS = {
    # No refresh flag: a plain step, even for items whose clock reaches a multiple of their period.
    "plain": dict(refresh=False, items=[dict(clock=3), dict(clock=4, frequency=5), dict(clock=2, frequency=3)],
                  refreshed=[False, False, False]),
    "refresh_all_due": dict(refresh=True, items=[dict(clock=9), dict(clock=4, frequency=5), dict(clock=2, frequency=3)],
                            refreshed=[True, True, True]),
    "refresh_one_not_due": dict(refresh=True,
                                items=[dict(clock=9), dict(clock=5, frequency=5), dict(clock=2, frequency=3)],
                                refreshed=[True, False, True]),
    "no_grad_finite_garbage": dict(refresh=True, items=[dict(clock=9), dict(clock=4, frequency=5, has_grad=False),
                                                        dict(clock=2, frequency=3)], refreshed=[True, False, True]),
    "no_grad_nan_garbage": dict(refresh=True, items=[dict(clock=9), dict(clock=4, frequency=5, has_grad=False),
                                                     dict(clock=2, frequency=3)], bad={1: np.nan},
                                refreshed=[True, False, True]),
    "nan_grad": dict(refresh=True, items=[dict(clock=9), dict(clock=4, frequency=5, skipped=1),
                                          dict(clock=2, frequency=3)], bad={1: np.nan}, refreshed=[True, False, True]),
    "inf_grad_plain": dict(refresh=False, items=[dict(), dict(), dict()], bad={2: -np.inf},
                           refreshed=[False, False, False]),
    "weight_decay_zero": dict(refresh=True,
                              items=[dict(clock=9), dict(clock=5, frequency=5), dict(clock=2, frequency=3)],
                              hp=[{"weight_decay": 0.0}], refreshed=[True, False, True]),
    "correct_bias_false": dict(refresh=True,
                               items=[dict(clock=9), dict(clock=5, frequency=5), dict(clock=2, frequency=3)],
                               hp=[{"correct_bias": False}], refreshed=[True, False, True]),
    "normalize_grads": dict(refresh=True, items=[dict(clock=9), dict(clock=5, frequency=5), dict(clock=2, frequency=3)],
                            hp=[{"normalize_grads": True}], refreshed=[True, False, True]),
    "two_groups": dict(refresh=True,
                       items=[dict(clock=9, group=1), dict(clock=5, frequency=5), dict(clock=2, frequency=3, group=1)],
                       hp=[{}, {"lr": 0.005, "beta1": 0.5, "beta2": 0.8, "eps": 0.2, "weight_decay": 0.0,
                                "correct_bias": False, "normalize_grads": True}],
                       refreshed=[True, False, True]),
}


def build(name: str, seed: int = 0, shape=SHAPE, sizes=SIZES):
    sc = SCENARIOS[name]
    gen = np.random.default_rng(seed)
    defaults = [dict(step=3, shampoo_beta=0.95), dict(step=0, shampoo_beta=0.5), dict(step=11, shampoo_beta=0.8)]
    items = [random_item(gen, shape, sizes, **{**d, **f}) for d, f in zip(defaults, sc["items"])]
    for i, val in sc.get("bad", {}).items():
        items[i].g = items[i].g.copy()
        items[i].g.flat[5] = val
    rows = [{**BASE_HP, **r} for r in sc.get("hp", [{}])]
    return sc, items, rows


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_step_against_per_item_reference(name):
    sc, items, rows = build(name)
    plan, bucket = to_bucket(items, SHAPE, SIZES)
    before = clone_bucket(bucket)
    result = step((plan,), (bucket,), to_hyper(rows), (sc["refresh"],), "householder")
    assert result is None
    flags = check_bucket(bucket, before, items, rows, sc["refresh"])
    assert flags == sc["refreshed"]


def test_step_refresh_reorders_eigenvalues():
    """Scenario sanity: with random (not eigen-) bases the sort of §4 is a real permutation, so V's permutation
    and the reordering of Q are exercised by the refresh scenarios above."""
    _, items, _ = build("refresh_all_due")
    nontrivial = 0
    for it in items:
        for f, q in zip(it.factors, it.bases):
            order = np.argsort(-np.diag(q.T @ f @ q))
            nontrivial += not np.array_equal(order, np.arange(len(order)))
    assert nontrivial >= 3


def test_step_nan_item_is_frozen_except_counters():
    _, items, rows = build("nan_grad")
    plan, bucket = to_bucket(items, SHAPE, SIZES)
    before = clone_bucket(bucket)
    step((plan,), (bucket,), to_hyper(rows), (True,), "householder")
    assert bucket.skipped[1].item() == before.skipped[1].item() + 1
    assert bucket.refresh_clock[1].item() == before.refresh_clock[1].item() + 1  # 5: a multiple of 5, but skipped
    assert bucket.step[1].item() == before.step[1].item()
    for name in ("params", "exp_avg", "exp_avg_sq"):
        assert torch.equal(getattr(bucket, name)[1], getattr(before, name)[1]), name
    for new, old in zip(bucket.factors + bucket.eigenbases, before.factors + before.eigenbases):
        assert torch.equal(new[1], old[1])
    # The grads slot is input only, the other items moved.
    assert not torch.equal(bucket.params[0], before.params[0])


def test_step_no_grad_item_is_frozen_entirely():
    _, items, rows = build("no_grad_nan_garbage")
    plan, bucket = to_bucket(items, SHAPE, SIZES)
    before = clone_bucket(bucket)
    step((plan,), (bucket,), to_hyper(rows), (True,), "householder")
    for name in ("params", "exp_avg", "exp_avg_sq", "step", "refresh_clock", "skipped"):
        assert torch.equal(getattr(bucket, name)[1], getattr(before, name)[1]), name
    for new, old in zip(bucket.factors + bucket.eigenbases, before.factors + before.eigenbases):
        assert torch.equal(new[1], old[1])


def test_step_with_absent_axis():
    """2-D items whose second axis has no factor (identity along it), in a refresh step."""
    sc, items, rows = build("refresh_one_not_due", seed=1, sizes=(4, None))
    plan, bucket = to_bucket(items, SHAPE, (4, None))
    before = clone_bucket(bucket)
    step((plan,), (bucket,), to_hyper(rows), (True,), "householder")
    assert bucket.factors[1] is None and bucket.eigenbases[1] is None
    assert check_bucket(bucket, before, items, rows, True) == [True, False, True]


def test_step_two_buckets_in_one_call():
    """A 2-D bucket that refreshes and a 3-D bucket (middle axis without a factor) that does not, in one call."""
    _, items_a, rows = build("refresh_all_due", seed=2)
    gen = np.random.default_rng(3)
    shape_b, sizes_b = (2, 5, 3), (2, None, 3)
    items_b = [random_item(gen, shape_b, sizes_b, clock=c, frequency=f, step=s, group=1)
               for c, f, s in [(2, 3, 2), (7, 4, 6)]]
    rows = rows + [{**BASE_HP, "lr": 0.01, "beta1": 0.8, "weight_decay": 0.0}]
    plan_a, bucket_a = to_bucket(items_a, SHAPE, SIZES)
    plan_b, bucket_b = to_bucket(items_b, shape_b, sizes_b)
    before_a, before_b = clone_bucket(bucket_a), clone_bucket(bucket_b)
    step((plan_a, plan_b), (bucket_a, bucket_b), to_hyper(rows), (True, False), "householder")
    assert check_bucket(bucket_a, before_a, items_a, rows, True) == [True, True, True]
    assert check_bucket(bucket_b, before_b, items_b, rows, False) == [False, False]


def test_step_3d_refresh():
    """3-D items with a factor on every axis: the refresh permutes V along each axis in turn."""
    gen = np.random.default_rng(4)
    shape, sizes = (3, 2, 4), (3, 2, 4)
    items = [random_item(gen, shape, sizes, clock=c, frequency=f, step=s, shampoo_beta=bs)
             for c, f, s, bs in [(4, 5, 4, 0.9), (1, 2, 1, 0.6), (3, 3, 2, 0.95)]]
    rows = [dict(BASE_HP)]
    plan, bucket = to_bucket(items, shape, sizes)
    before = clone_bucket(bucket)
    step((plan,), (bucket,), to_hyper(rows), (True,), "householder")
    assert check_bucket(bucket, before, items, rows, True) == [True, True, False]
