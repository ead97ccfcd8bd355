"""CompiledSOAP against the reference SOAP, compile hygiene, and checkpoints.

The reference is an independent per-parameter implementation (it shares no math with compiled_soap.stacked), so
agreement here is evidence, not tautology. Spec trap 7: two implementations agree only when the factors are full
rank and well separated. After one gradient a rectangular factor is rank deficient, and its null-space eigenvectors
are decided by rounding noise; so every parameter's FIRST gradient is integer-valued (its Gram matrices are exact in
both implementations, hence the same eigh input and output), and later ones are random and full rank. (On the CPU
the initial factors are also bitwise the reference's for random gradients: see the last test.)
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch._dynamo.utils import counters

from compiled_soap import SOAP, CompiledSOAP

SHAPE_CLASSES = {
    "2d-square": ([(6, 6)], {}),
    "2d-rect": ([(8, 5), (3, 7)], {}),
    "1d-plain": ([(7,)], {}),
    "1d-precond": ([(7,)], {"precondition_1d": True}),
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


def relative_deviation(a, b, start):
    move = sum(float((x.detach() - s.detach()).double().norm() ** 2) for x, s in zip(a, start)) ** 0.5
    dev = sum(float((x.detach() - y.detach()).double().norm() ** 2) for x, y in zip(a, b)) ** 0.5
    return dev / max(move, 1e-300)


TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(SHAPE_CLASSES))
@pytest.mark.parametrize("groups,late", [(False, ()), (True, (0,))])
def test_matches_reference_eager(name, dtype, groups, late):
    shapes, kw = SHAPE_CLASSES[name]
    kw = {"precondition_frequency": 3, "weight_decay": 0.05, **kw}
    ref, start, ref_opt = run(lambda pg: SOAP(pg, **kw), shapes, dtype, 11, groups, late)
    fast, _, opt = run(lambda pg: CompiledSOAP(pg, compile=False, **kw), shapes, dtype, 11, groups, late)
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
    fast, _, opt = run(lambda pg: CompiledSOAP(pg, backend="aot_eager", **kw), *args)
    assert relative_deviation(ref, fast, start) < TOL[dtype]


def test_compiled_with_inductor_matches_reference():
    """The shipped configuration (Inductor, reduce-overhead; cudagraphs only apply on CUDA) on a tiny model."""
    shapes = [(6, 4), (4,)]
    kw = {"precondition_frequency": 2}
    ref, start, _ = run(lambda pg: SOAP(pg, **kw), shapes, torch.float32, 6)
    fast, _, opt = run(lambda pg: CompiledSOAP(pg, **kw), shapes, torch.float32, 6)
    assert relative_deviation(ref, fast, start) < 1e-5
    assert opt.compile_seconds > 0


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


def _snapshot(params, opt):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("compile", [False, True])
def test_bitwise_resume(compile):
    shapes = [(6, 4), (5,), (3, 4, 2), ()]
    stream = gradient_stream(shapes, torch.float32, 16)
    kw = dict(precondition_frequency=3, compile=compile, backend="aot_eager")
    params = make_params(shapes, torch.float32)
    opt = CompiledSOAP([{"params": params[:2]}, {"params": params[2:], "lr": 1e-2}], **kw)
    for t, grads in enumerate(stream):
        if t == 7:
            buf = io.BytesIO()
            torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    resumed = [torch.nn.Parameter(t.clone()) for t in ckpt["params"]]
    opt2 = CompiledSOAP([{"params": resumed[:2]}, {"params": resumed[2:], "lr": 1e-2}], **kw)
    opt2.load_state_dict(ckpt["opt"])
    for grads in stream[7:]:
        for p, g in zip(resumed, grads):
            p.grad = g.clone()
        opt2.step()
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        assert int(a["step"]) == int(b["step"])


@pytest.mark.parametrize("direction", ["reference->compiled", "compiled->reference"])
def test_cross_load_with_reference(direction):
    shapes = [(6, 4), (7,), (2, 3, 4)]
    dtype = torch.float64
    stream = gradient_stream(shapes, dtype, 14)
    kw = dict(precondition_frequency=3)
    first, second = (SOAP, CompiledSOAP) if direction == "reference->compiled" else (CompiledSOAP, SOAP)
    extra = lambda cls: {"compile": False} if cls is CompiledSOAP else {}  # noqa: E731

    params = make_params(shapes, dtype)
    opt = first(params, **kw, **extra(first))
    for grads in stream[:6]:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    ckpt = copy.deepcopy(opt.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = second(resumed, **kw, **extra(second))
    other.load_state_dict(ckpt)
    start = [p.detach().clone() for p in params]
    for grads in stream[6:]:
        for ps in (params, resumed):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        opt.step()
        other.step()
    assert relative_deviation(params, resumed, start) < 1e-10


# ---------------------------------------------------------------------------------------------------- CUDA

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cuda_model(n_layers, d=64, seed=0):
    # Square matrices: full-rank factors from the first (integer) gradient on, so that batched and per-matrix
    # cuSOLVER eigh (different algorithms on CUDA) agree up to column signs (spec trap 7).
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(d,), (d,)] + [s for _ in range(n_layers) for s in [(d, d), (d,), (d, d), (d, d), (d,)]]
    return [torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen) * 0.1) for s in shapes]


def _cuda_grads(params, step):
    gen = torch.Generator(device="cuda").manual_seed(1000 + step)
    for p in params:
        if step == 0:
            p.grad = torch.randint(-3, 4, p.shape, device="cuda", generator=gen).float()
        else:
            p.grad = torch.randn(p.shape, device="cuda", generator=gen)


@cuda
@pytest.mark.cuda
def test_cuda_matches_reference_fp32():
    import torch._inductor.config as inductor_config

    counters.clear()
    a, b = _cuda_model(2), _cuda_model(2)
    start = [p.detach().clone() for p in a]
    ref = SOAP(a, precondition_frequency=3)
    with inductor_config.patch({"triton.cudagraph_or_error": True}):
        fast = CompiledSOAP(b, precondition_frequency=3)
        for t in range(10):
            _cuda_grads(a, t)
            _cuda_grads(b, t)
            ref.step()
            fast.step()
    assert relative_deviation(a, b, start) < 1e-4
    assert counters["inductor"]["cudagraph_skips"] == 0


def _count_launches(opt, params, steps, first_step):
    from torch.profiler import ProfilerActivity, profile

    for t in range(first_step, first_step + 4):  # warm-up: compile, record, replay
        _cuda_grads(params, t)
        opt.step()
    torch.cuda.synchronize()
    grads = []
    for t in range(steps):
        _cuda_grads(params, first_step + 10 + t)
        grads.append([p.grad for p in params])
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = gi
            opt.step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    graph_launches = sum(n.startswith("cudaGraphLaunch") for n in names)
    other = sum(n.startswith(("cudaLaunchKernel", "cuLaunchKernel", "cudaMemcpyAsync")) for n in names)
    return graph_launches / steps, other / steps


@cuda
@pytest.mark.cuda
def test_cuda_one_graph_replay_per_step_independent_of_model_size():
    per_size = {}
    for layers in (2, 6):
        params = _cuda_model(layers)
        # f large: every measured step is a plain step.
        opt = CompiledSOAP(params, precondition_frequency=1000)
        _cuda_grads(params, 0)
        opt.step()
        per_size[layers] = _count_launches(opt, params, steps=5, first_step=1)
    for layers, (graphs, other) in per_size.items():
        assert graphs == 1, per_size
        assert other <= 5, per_size
    assert per_size[2][1] == per_size[6][1]


@cuda
@pytest.mark.cuda
def test_cuda_no_host_sync_in_steady_state():
    params = _cuda_model(2)
    opt = CompiledSOAP(params, precondition_frequency=4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.99**s)
    for t in range(12):  # warm up both graphs
        _cuda_grads(params, t)
        opt.step()
        sched.step()
    torch.cuda.synchronize()
    grads = []
    for t in range(12, 22):
        _cuda_grads(params, t)
        grads.append([p.grad for p in params])
    torch.cuda.set_sync_debug_mode("error")
    try:
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = gi
            opt.step()
            sched.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in params)


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
    nvtx_ranges._attributes.cache_clear()
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
    nvtx_ranges._attributes.cache_clear()


@pytest.mark.parametrize("zero_style", ["in-place", "set-to-none", "alternating"])
def test_zero_grad_styles_match_reference(zero_style):
    """After a parameter's first step its .grad is a view of the optimizer's gradient buffer. Zeroing in place
    keeps it (backward accumulates straight into the buffer); set_to_none or model.zero_grad() drop it and the
    optimizer must copy the fresh gradients, never read the stale buffer."""
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
    if zero_style == "in-place":
        slots = {s.data_ptr() for b in opt._buckets for s in b.grad_slots}
        assert all(p.grad.data_ptr() in slots for p in fast)


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


def test_resume_with_in_place_zeroing_adopts_the_buffer():
    """After load_state_dict, the first step's copied gradients become slot views again, and the run continues
    exactly like the uninterrupted one."""
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 5, dtype=torch.float64)

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.Tanh(), torch.nn.Linear(5, 5)).double()

    def train(m, opt, steps):
        for _ in range(steps):
            opt.zero_grad(set_to_none=False)
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()

    m = model()
    opt = CompiledSOAP(m.parameters(), precondition_frequency=3, compile=False)
    train(m, opt, 5)
    ckpt = copy.deepcopy((m.state_dict(), opt.state_dict()))
    train(m, opt, 5)

    m2 = model()
    m2.load_state_dict(ckpt[0])
    opt2 = CompiledSOAP(m2.parameters(), precondition_frequency=3, compile=False)
    opt2.load_state_dict(ckpt[1])
    train(m2, opt2, 5)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
    slots = {s.data_ptr() for b in opt2._buckets for s in b.grad_slots}
    assert all(p.grad.data_ptr() in slots for p in m2.parameters())


def test_refresh_choice_with_late_count_readback(monkeypatch):
    """On CUDA the host learns the device's step counts late (an asynchronous copy it only reads once landed), and
    steps skipped for non-finite gradients are decided on the device. Emulate a read-back that lands three polls
    after it was issued, skip steps with NaN/Inf gradients, and check that every parameter still refreshes exactly
    when the reference's does (a missed or early refresh changes the basis and the trajectory)."""
    from compiled_soap import compiled

    class LateReadBack(compiled._ReadBack):
        def __init__(self, t):
            super().__init__(t)
            self.polls = 0

        def ready(self):
            self.polls += 1
            return self.polls > 3

    monkeypatch.setattr(compiled, "_ReadBack", LateReadBack)
    shapes = [(5, 5), (4, 3), (6,)]
    stream = gradient_stream(shapes, torch.float64, 30)
    for t, i, bad in [(5, 0, float("nan")), (13, 0, float("inf")), (9, 1, float("nan")), (2, 2, float("-inf"))]:
        stream[t][i] = stream[t][i].clone()
        stream[t][i].view(-1)[0] = bad
    kw = dict(precondition_frequency=4, precondition_1d=True)
    runs = []
    for factory in (lambda ps: SOAP(ps, **kw), lambda ps: CompiledSOAP(ps, compile=False, **kw)):
        params = make_params(shapes, torch.float64)
        opt = factory(params)
        kinds = []
        for grads in stream:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
            kinds.append(getattr(opt, "last_step_kind", None))
        runs.append((params, opt, kinds))
    (ref, ref_opt, _), (fast, opt, kinds) = runs
    assert relative_deviation(ref, fast, make_params(shapes, torch.float64)) < 1e-10
    for p_ref, p_fast in zip(ref, fast):
        assert int(ref_opt.state[p_ref]["step"]) == int(opt.state[p_fast]["step"])
        assert ref_opt.state[p_ref]["skipped"] == int(opt.state[p_fast]["skipped"])
    # Without skips refreshes would run at calls 5, 9, ..., 29 only; the host could not know about the skips in time,
    # so it also ran the refresh graph at calls where a parameter might have been due.
    refresh_calls = [t + 1 for t, k in enumerate(kinds) if k == "refresh"]
    assert set(range(5, 31, 4)) <= set(refresh_calls) and len(refresh_calls) > len(range(5, 31, 4))


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


@pytest.mark.parametrize("cls", [SOAP, CompiledSOAP])
def test_param_group_given_as_generator(cls):
    """[{"params": model.parameters()}] is the usual way to build groups; the check must not consume it."""
    model = torch.nn.Linear(3, 3)
    kw = {"compile": False} if cls is CompiledSOAP else {}
    opt = cls([{"params": model.parameters(), "lr": 1e-2}], **kw)
    assert len(opt.param_groups[0]["params"]) == 2
    opt.add_param_group({"params": torch.nn.Linear(2, 2).parameters()})
    assert len(opt.param_groups[1]["params"]) == 2
