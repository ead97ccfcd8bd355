"""CompiledSOAP against the reference SOAP: every shape class, param groups, late parameters, schedulers,
zero_grad styles, 16-bit parameters, eager and traced (the variants of conftest.VARIANTS), Inductor once.

The reference is an independent per-parameter implementation (it shares no math with compiled_soap.stacked), so
agreement here is evidence, not tautology. docs/spec.md trap 7: two implementations agree only when the factors are
full rank and well separated. After one gradient a rectangular factor is rank deficient, and its null-space
eigenvectors are decided by rounding noise; so every parameter's FIRST gradient is integer-valued (its Gram matrices
are exact in both implementations, hence the same eigh input and output), later ones are random, and every factor is
full rank by the first refresh. (The initial factors are also bitwise the reference's for random gradients: see the
last tests.)
"""

from __future__ import annotations

import functools
import pytest
import torch
from torch._dynamo.utils import counters

from conftest import INDUCTOR, VARIANTS, relative_deviation
from compiled_soap import SOAP, CompiledSOAP

COMPILED = [n for n in VARIANTS if n != "soap"]

SHAPE_CLASSES = {
    "2d-square": ([(6, 6)], {}),
    "2d-rect": ([(8, 5), (3, 7)], {}),
    "1d-plain": ([(7,)], {}),
    "1d-precond": ([(3,)], {"precondition_1d": True}),  # rank 1 per call: full rank (3) before the first refresh
    "3d": ([(3, 4, 5)], {}),
    "4d-merge-channels-last": ([(4, 3, 3, 2), (2, 5, 5, 3)],
                               {"merge_dims": True, "max_precond_dim": 10, "data_format": "channels_last"}),
    "4d-merge": ([(4, 3, 3, 2)], {"merge_dims": True, "max_precond_dim": 8}),
    "above-max-dim": ([(20, 3)], {"max_precond_dim": 6}),
    "0-dim": ([()], {}),
    "0-dim-merge": ([()], {"merge_dims": True}),
}


def make_params(shapes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def gradient_stream(shapes, dtype, steps, seed=1, late=()):
    """Per step, a list of gradients (None for a parameter in `late` during the first 3 steps)."""
    gen = torch.Generator().manual_seed(seed)
    seen = set()
    out = []
    for t in range(steps):
        grads = []
        for i, s in enumerate(shapes):
            if i in late and t < 3:
                grads.append(None)
                continue
            if i not in seen:
                g = torch.randint(-3, 4, s, generator=gen).to(dtype)
                seen.add(i)
            else:
                scale = 1 + torch.arange(int(torch.tensor(s).prod())).reshape(s) % 3
                g = torch.randn(s, generator=gen, dtype=dtype) * scale
            grads.append(g)
        out.append(grads)
    return out


def run(opt_factory, shapes, dtype, steps, groups=False, late=(), scheduler=False):
    params = make_params(shapes, dtype)
    if groups and len(params) > 1:
        pg = [{"params": params[:1], "lr": 1e-2, "weight_decay": 0.0, "betas": (0.9, 0.99)},
              {"params": params[1:]}]
    elif groups:
        pg = [{"params": params, "lr": 2e-3, "eps": 1e-6}]
    else:
        pg = params
    opt = opt_factory(pg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s)) if scheduler else None
    start = [p.detach().clone() for p in params]
    for grads in gradient_stream(shapes, dtype, steps, late=late):
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.step()
        if sched:
            sched.step()
    return params, start, opt


TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(SHAPE_CLASSES))
@pytest.mark.parametrize("groups,late", [(False, ()), (True, (0,))])
def test_matches_reference_eager(name, dtype, groups, late):
    shapes, kw = SHAPE_CLASSES[name]
    kw = {"precondition_frequency": 3, "weight_decay": 0.05, **kw}
    ref, start, ref_opt = run(lambda pg: SOAP(pg, **kw), shapes, dtype, 11, groups, late)
    fast, _, opt = run(lambda pg: VARIANTS["stacked-eager"](pg, **kw), shapes, dtype, 11, groups, late)
    assert relative_deviation(ref, fast, start) < TOL[dtype]
    # Same state, in the reference's layout and meaning (M and V in the eigenbasis).
    for p_ref, p_fast in zip(ref, fast):
        s_ref, s_fast = ref_opt.state[p_ref], opt.state[p_fast]
        assert int(s_ref["step"]) == int(s_fast["step"])
        assert s_fast["exp_avg"].shape == s_ref["exp_avg"].shape
        assert [f is None for f in s_ref["GG"]] == [f is None for f in s_fast["GG"]]
        for f_ref, f_fast in zip(s_ref["GG"], s_fast["GG"]):
            if f_ref is not None:
                torch.testing.assert_close(f_fast, f_ref, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=0)


ALL_SHAPES = [s for shapes, kw in SHAPE_CLASSES.values() if not kw for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference_compiled_mixed_buckets(dtype):
    """Dynamo-traced (aot_eager: the same graph Inductor would get, without C++ codegen) with several buckets,
    two param groups, a late parameter and a scheduler."""
    kw = {"precondition_frequency": 3}
    args = (ALL_SHAPES, dtype, 11, True, (2,), True)
    ref, start, _ = run(lambda pg: SOAP(pg, **kw), *args)
    fast, _, opt = run(lambda pg: VARIANTS["aot-eager"](pg, **kw), *args)
    assert relative_deviation(ref, fast, start) < TOL[dtype]


@pytest.mark.compile
def test_compiled_with_inductor_matches_reference():
    """Inductor (its CPU code generation) on a tiny model; cudagraphs only apply on CUDA."""
    shapes = [(6, 4), (4,)]
    kw = {"precondition_frequency": 2}
    ref, start, _ = run(lambda pg: SOAP(pg, **kw), shapes, torch.float32, 6)
    fast, _, opt = run(lambda pg: INDUCTOR(pg, **kw), shapes, torch.float32, 6)
    assert relative_deviation(ref, fast, start) < 1e-5
    assert opt.compile_seconds > 0
    assert opt.compile_unit == "plan"  # compile_per="auto": two buckets of two kinds (docs/design.md §7)


def test_compile_hygiene_scheduler_and_groups():
    """Over 35 steps with lr changing every step and two param groups: no graph break, exactly two graphs (plain
    and refresh), none added after warm-up."""
    counters.clear()
    shapes = [(6, 4), (6, 4), (5,), (3, 4, 2)]
    params = make_params(shapes, torch.float32)
    opt = CompiledSOAP([{"params": params[:2]}, {"params": params[2:], "lr": 1e-2, "weight_decay": 0.0}],
                       precondition_frequency=4, backend="aot_eager")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.99**s)
    kinds = []
    graphs_after_warmup = None
    for t, grads in enumerate(gradient_stream(shapes, torch.float32, 35)):
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        sched.step()
        kinds.append(opt.last_step_kind)
        if t == 10:
            graphs_after_warmup = counters["stats"]["unique_graphs"]
    assert kinds[0] == "init"
    assert [t + 1 for t, k in enumerate(kinds) if k == "refresh"] == list(range(5, 36, 4))
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 2
    assert graphs_after_warmup == 2


def test_nvtx_ranges_name_the_step_kinds(monkeypatch):
    """The ranges an nsys timeline shows, in order, for init, plain, refresh and compile calls."""
    from compiled_soap import nvtx_ranges

    opened = []

    class Recorder:
        def get_event_attributes(self, message):
            return message

        def push_range(self, name):
            opened.append(name)

        def pop_range(self):
            opened.append("/")

    monkeypatch.setattr(nvtx_ranges, "_DOMAIN", Recorder())
    # The recorder's attributes are strings: never leave them cached for the real domain, pass or fail.
    uncached = nvtx_ranges._attributes.__wrapped__
    monkeypatch.setattr(nvtx_ranges, "_attributes", functools.lru_cache(maxsize=None)(uncached))
    shapes = [(4, 3), (3,)]
    params = make_params(shapes, torch.float32)
    opt = CompiledSOAP(params, precondition_frequency=2, compile=False)
    seen = []
    for grads in gradient_stream(shapes, torch.float32, 4):
        for p, g in zip(params, grads):
            p.grad = g
        opened.clear()
        opt.step()
        seen.append([n for n in opened if n != "/"])
        assert opened.count("/") == len(seen[-1])  # every range closed
    assert seen == [
        ["step", "prepare", "initialize"],
        ["step", "prepare", "graph/plain"],
        ["step", "prepare", "graph/refresh"],
        ["step", "prepare", "graph/plain"],
    ]


@pytest.mark.parametrize("zero_style", ["in-place", "set-to-none", "alternating"])
def test_zero_grad_styles_match_reference(zero_style):
    """Every zero_grad style gives SOAP's result; the optimizer reads .grad and never takes it over."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 6, dtype=torch.float64)

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6)).double()

    def train(cls, style, **kw):
        m = model()
        opt = cls(m.parameters(), precondition_frequency=3, **kw)
        for t in range(9):
            if style == "in-place" or (style == "alternating" and t % 3 == 0):
                opt.zero_grad(set_to_none=False)
            elif style == "alternating" and t % 3 == 1:
                m.zero_grad()
            else:
                opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
        return list(m.parameters()), opt

    ref, _ = train(SOAP, zero_style)
    fast, opt = train(CompiledSOAP, zero_style, compile=False)
    copied, _ = train(CompiledSOAP, "set-to-none", compile=False)
    start = list(model().parameters())
    assert relative_deviation(ref, fast, start) < 1e-8  # fp64 rounding, grown by the sign-like first updates
    assert all(torch.equal(a, b) for a, b in zip(fast, copied))
    if zero_style == "in-place":  # the user's gradient tensors stay the user's
        grads = [p.grad for p in fast]
        opt.zero_grad(set_to_none=False)
        assert all(p.grad is g and not g.any() for p, g in zip(fast, grads))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_match_reference(dtype):
    """16-bit parameters keep fp32 state in both classes and round the parameter after each of the two updates."""
    shapes = [(6, 6), (5,)]
    kw = {"precondition_frequency": 3, "lr": 1e-2}
    ref, start, ref_opt = run(lambda pg: SOAP(pg, **kw), shapes, dtype, 8)
    fast, _, opt = run(lambda pg: CompiledSOAP(pg, compile=False, **kw), shapes, dtype, 8)
    for p_ref, p_fast in zip(ref, fast):
        assert p_fast.dtype == dtype and opt.state[p_fast]["exp_avg"].dtype == torch.float32
        # Within a couple of 16-bit ulps of the reference.
        torch.testing.assert_close(p_fast, p_ref, rtol=2 * torch.finfo(dtype).eps, atol=1e-3)
    assert relative_deviation(ref, fast, start) < 5e-2


def test_add_param_group_mid_training_matches_reference():
    """A group added after a few steps: its parameters initialise at their first step in a new bucket (a new plan
    and, compiled, a new graph), the existing ones carry on."""
    shapes = [(6, 6), (4,), (5, 3)]
    stream = gradient_stream(shapes, torch.float64, 12)
    stream[4][2] = torch.randint(-3, 4, shapes[2], generator=torch.Generator().manual_seed(7)).double()  # trap 7
    results = []
    for cls, kw in ((SOAP, {}), (CompiledSOAP, {"compile": False})):
        params = make_params(shapes, torch.float64)
        opt = cls(params[:2], precondition_frequency=3, **kw)
        for t, grads in enumerate(stream):
            if t == 4:
                opt.add_param_group({"params": [params[2]], "lr": 1e-2, "precondition_frequency": 2})
            for p, g in zip(params if t >= 4 else params[:2], grads):
                p.grad = g.clone()
            opt.step()
        results.append(params)
    start = make_params(shapes, torch.float64)
    assert relative_deviation(results[0], results[1], start) < 1e-10


@pytest.mark.parametrize("name", ["2d-rect", "3d", "4d-merge-channels-last", "1d-precond", "above-max-dim"])
def test_initial_basis_is_the_references_even_with_random_gradients(name):
    """The first eigenbasis of a rank-deficient factor is decided by rounding (trap 7). CompiledSOAP builds its
    first factors with the per-matrix product the reference uses, so on the CPU its initial factors and bases are
    the reference's bit for bit, and runs from random (non-integer) first gradients agree to fp32 rounding."""
    shapes, kw = SHAPE_CLASSES[name]
    kw = {"precondition_frequency": 3, **kw}
    gen = torch.Generator().manual_seed(3)
    stream = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(12)]
    runs = []
    for factory in (lambda ps: SOAP(ps, **kw), lambda ps: CompiledSOAP(ps, compile=False, **kw)):
        params = make_params(shapes, torch.float32)
        opt = factory(params)
        states = []
        for grads in stream:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
            if not states:
                states = [([f.clone() for f in opt.state[p]["GG"] if f is not None],
                           [q.clone() for q in opt.state[p]["Q"] if q is not None]) for p in params]
        runs.append((params, states))
    (ref, ref_states), (fast, fast_states) = runs
    for (f_ref, q_ref), (f_fast, q_fast) in zip(ref_states, fast_states):
        assert all(torch.equal(a, b) for a, b in zip(f_ref, f_fast))
        assert all(torch.equal(a, b) for a, b in zip(q_ref, q_fast))
    assert relative_deviation(ref, fast, make_params(shapes, torch.float32)) < 1e-5




def test_initial_basis_bitwise_for_a_transposed_view_parameter():
    """A non-contiguous parameter (a transposed view) with a random first gradient laid out like it: the first
    factors are computed per parameter with the paper's operations on the gradient as it is, so the factors and
    eigenbases are the reference's bit for bit (a stacked, contiguous copy would round differently: trap 7)."""
    gen = torch.Generator().manual_seed(4)
    base = [torch.randn(7, 5, generator=gen), torch.randn(4, 6, 3, generator=gen)]
    grads = [torch.randn(7, 5, generator=gen).t(), torch.randn(4, 6, 3, generator=gen).permute(2, 0, 1)]
    states = []
    for factory in (SOAP, VARIANTS["stacked-eager"]):
        params = [torch.nn.Parameter(base[0].t()), torch.nn.Parameter(base[1].permute(2, 0, 1))]
        assert not any(p.is_contiguous() for p in params) and not any(g.is_contiguous() for g in grads)
        opt = factory(params)
        for p, g in zip(params, grads):
            p.grad = g.clone()  # keeps the transposed layout
        opt.step()
        states.append([(opt.state[p]["GG"], opt.state[p]["Q"]) for p in params])
    for (gg_ref, q_ref), (gg, q) in zip(*states):
        assert all(torch.equal(a, b) for a, b in zip(gg_ref, gg))
        assert all(torch.equal(a, b) for a, b in zip(q_ref, q))
