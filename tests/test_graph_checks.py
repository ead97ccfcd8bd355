"""The checks of tests/graph_checks.py, on small hand-written steps (each must pass or fail as Inductor would decide),
then on CompiledSOAP's own step graphs and host reads.

Everything runs on the CPU: CaptureBackend traces like backend="aot_eager", the CUDA-graph preconditions are checked
on a fake-tensor replay of the graphs (see graph_checks' docstring).
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch
from graph_checks import (
    ALLOWED_EXTERN_OPS,
    CaptureBackend,
    HostReadLog,
    check_cuda_capturable,
    check_mutated_inputs_static,
    cuda_forward_graph,
    extern_ops,
    find_problems,
    graph_node_count,
)

pytestmark = pytest.mark.xdist_group("graph_checks")  # the tests share one traced run (pyproject.toml)


def _static(*tensors):
    for t in tensors:
        torch._dynamo.mark_static_address(t, guard=False)
    return tensors


def _state():
    """Fresh tensors for a hand-written step, all marked static like an optimizer's persistent state."""
    gen = torch.Generator().manual_seed(0)
    s = {"m": torch.randn(4, 4, generator=gen), "x": torch.randn(3, generator=gen),
         "i": torch.zeros(3, dtype=torch.int64)}
    _static(*s.values())
    return s


def _record(fn, *args, calls=1, **config):
    """Compile `fn` with a CaptureBackend, call it, return the backend's only graph record."""
    backend = CaptureBackend()
    compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)
    with torch._dynamo.config.patch(**config), torch.no_grad():
        for _ in range(calls):
            out = compiled(*args)
    assert len(backend.records) == 1, [r.name for r in backend.records]
    return backend.records[0], out


# ---------------------------------------------------------------------------------------------------- (a) fine


def fine_step(s):
    m, x = s["m"], s["x"]
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)  # the inputs' device: not a CPU tensor on a GPU
    q, _ = torch.linalg.qr(m @ m.transpose(-1, -2) + eye)
    m.copy_(q)
    x.mul_(0.9).add_(torch.zeros(3, device=x.device))
    s["i"].add_(1)


def test_fine_step_passes_every_check():
    s = _state()
    expected = {k: v.clone() for k, v in s.items()}
    fine_step(expected)
    record, out = _record(fine_step, s)
    assert out is None
    for k in s:  # CaptureBackend computes what eager (and aot_eager) computes
        torch.testing.assert_close(s[k], expected[k], rtol=0, atol=0)
    check_cuda_capturable(record)
    assert find_problems(record) == {"signature": [], "devices": [], "ops": [], "static_inputs": []}
    assert sorted({name for name, _ in extern_ops(cuda_forward_graph(record).gm)}) == ["aten.linalg_qr"]
    counts = graph_node_count(record)
    assert counts.dynamo_ops >= 8 and counts.aten_ops >= counts.dynamo_ops - 2, counts
    assert record.name == "fine_step"
    assert sorted(record.input_name(i).lower() for i in record.mutated_input_indices) == ["l_s_i_", "l_s_m_",
                                                                                          "l_s_x_"]


def test_parameters_are_static_without_marking():
    def scale(p):
        p.mul_(2)

    record, _ = _record(scale, torch.nn.Parameter(torch.ones(3)))
    check_cuda_capturable(record)
    assert record.inputs[0].is_parameter


# ---------------------------------------------------------------------------------------------------- (b) CPU tensors


def scalar_tensor_step(s):
    s["x"].add_(torch.tensor(1.0))  # no device: the default device, the CPU on a GPU machine too


def dot_cpu_step(s):
    s["x"].mul_(s["x"].cpu().sum())


def cpu_string_step(s):
    s["x"].add_(torch.zeros(3, device="cpu").sum())


@pytest.mark.parametrize("fn, what", [(scalar_tensor_step, "torch.tensor without a device"),
                                      (dot_cpu_step, "Tensor.cpu()"),
                                      (cpu_string_step, "device 'cpu' given to torch.zeros")])
def test_cpu_tensor_inside_fails(fn, what):
    record, _ = _record(fn, _state())
    with pytest.raises(AssertionError, match=r"\[devices\] makes a CPU tensor") as e:
        check_cuda_capturable(record)
    assert what in str(e.value)
    assert f"in {fn.__name__}" in str(e.value)  # the source line is named
    assert find_problems(record, ["signature", "ops", "static_inputs"]) == {
        "signature": [], "ops": [], "static_inputs": []}


def test_changing_python_float_fails():
    # The second value recompiles with the float as an input: a CPU scalar tensor, which Inductor's own device check
    # refuses too.
    def scaled(x, lr):
        x.mul_(lr)

    backend = CaptureBackend()
    x = _static(torch.ones(3))[0]
    compiled = torch.compile(scaled, fullgraph=True, backend=backend)
    for lr in (0.5, 0.25):
        compiled(x, lr)
    assert len(backend.records) == 2
    check_cuda_capturable(backend.records[0])
    problems = find_problems(backend.records[1])
    assert any("python-number input l_lr_" in p.lower() for p in problems["signature"]), problems
    assert any("check_multiple_devices_or_any_cpu_nodes" in p and "cpu device" in p
               for p in problems["devices"]), problems


# ---------------------------------------------------------------------------------------------------- (c) ops


def eigh_step(s):
    s["m"].copy_(torch.linalg.eigh(s["m"])[1])


def item_step(s):
    n = s["i"][0].item()
    s["x"].add_(n)


def int64_index_add_step(s):
    index = torch.zeros(2, dtype=torch.int64, device=s["i"].device)
    s["i"].index_add_(0, index, torch.ones(2, dtype=torch.int64, device=s["i"].device))


@pytest.mark.parametrize("fn, op, config", [
    (eigh_step, "host-sync op aten._linalg_eigh", {}),
    (item_step, "host-sync op aten._local_scalar_dense", {"capture_scalar_outputs": True}),
    (int64_index_add_step, "extern op not in ALLOWED_EXTERN_OPS: aten.index_put (accumulate into torch.int64", {}),
])
def test_refused_op_fails_naming_it(fn, op, config):
    record, _ = _record(fn, _state(), **config)
    with pytest.raises(AssertionError, match=r"\[ops\] ") as e:
        check_cuda_capturable(record)
    assert op in str(e.value)
    assert f"in {fn.__name__}" in str(e.value)


def test_item_is_also_refused_by_inductors_own_check():
    record, _ = _record(item_step, _state(), capture_scalar_outputs=True)
    assert any(p.startswith("get_first_incompatible_cudagraph_node: aten._local_scalar_dense")
               for p in find_problems(record, ["ops"])["ops"])


def test_allowed_extern_ops_is_the_gate(monkeypatch):
    record, _ = _record(fine_step, _state())
    monkeypatch.setattr("graph_checks.ALLOWED_EXTERN_OPS", ALLOWED_EXTERN_OPS - {"aten.linalg_qr"})
    with pytest.raises(AssertionError, match=r"extern op not in ALLOWED_EXTERN_OPS: aten.linalg_qr"):
        check_cuda_capturable(record)


# ---------------------------------------------------------------------------------------------------- (d) static


def test_mutating_a_non_static_input_fails():
    def both(s, y):
        s["x"].add_(1)
        y.add_(1)

    record, _ = _record(both, _state(), torch.zeros(3))  # y is not marked
    with pytest.raises(AssertionError, match=r"(?i)1 of 2 mutated inputs are not static .*: l_y_$"):
        check_mutated_inputs_static(record)
    check_cuda_capturable(record, skip=("static_inputs",))


def test_mutating_an_unaligned_static_input_fails():
    base = torch.zeros(8)
    view = _static(base[1:4])[0]  # 4 bytes past the start of its storage

    def bump(v):
        v.add_(1)

    record, _ = _record(bump, view)
    with pytest.raises(AssertionError, match=r"(?i)not 16-byte aligned.*: l_v_"):
        check_mutated_inputs_static(record)


# ---------------------------------------------------------------------------------------------------- (e) outputs


def test_returning_an_output_fails():
    def step_with_output(s):
        s["x"].add_(1)
        return s["x"] * 2

    record, out = _record(step_with_output, _state())
    assert isinstance(out, torch.Tensor)
    with pytest.raises(AssertionError, match=r"\[signature\] the graph returns 1 output"):
        check_cuda_capturable(record)


# ---------------------------------------------------------------------------------------------------- (f) host reads


def test_host_read_log_records_each_read_once():
    t = torch.tensor([1.5, 2.0])
    with HostReadLog() as log:
        t[0].item()
        bool(t[0] > 1)
        float(t[1])
        int(t[1])
        [10, 20, 30][torch.tensor(1)]  # __index__
        t.tolist()
        torch.equal(t, t)
        t.nonzero()
        if t.sum() > 0:  # __bool__ again
            pass
        (t * 2).sum()  # no read
    assert [what for what, _ in log.reads] == [
        "Tensor.item", "Tensor.__bool__", "Tensor.__float__", "Tensor.__int__", "Tensor.__index__",
        "Tensor.tolist", "aten.equal", "aten.nonzero", "Tensor.__bool__"]
    assert all("test_host_read_log_records_each_read_once" in where for _, where in log.reads), log.reads


def test_host_read_log_records_device_to_host_copies():
    # No GPU here: fake cuda tensors go through the same dispatch as real ones.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, device="cuda")
        with HostReadLog() as log:
            x.cpu()
            x.to("cpu", torch.float64)
            x * 2  # no read
            x.to(torch.float64)  # stays on the device
    assert [what for what, _ in log.reads] == ["aten._to_copy cuda:0->cpu", "aten._to_copy cuda:0->cpu"]


def test_host_read_log_restores_tensor_methods():
    before = {name: torch.Tensor.__dict__.get(name) for name in ("item", "tolist", "__bool__", "__index__")}
    with pytest.raises(RuntimeError, match="boom"):
        with HostReadLog():
            assert torch.Tensor.__dict__.get("item") is not None
            raise RuntimeError("boom")
    assert {name: torch.Tensor.__dict__.get(name) for name in before} == before
    with HostReadLog() as log:
        pass
    torch.ones(()).item()
    assert log.reads == []


def test_host_read_log_around_compiled_calls_after_warm_up():
    # A plain TorchDispatchMode would make Dynamo skip the frame (an error with fullgraph=True); this one lets the
    # compiled graph run: no recompilation, same results, and it still sees reads inside the aot graph.
    def step(s):
        n = s["i"][0].item()
        s["x"].add_(n)

    s = _state()
    backend = CaptureBackend()
    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend=backend)
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        compiled(s)  # warm-up: compile outside the log
        x_before = s["x"].clone()
        s["i"].fill_(2)
        with HostReadLog() as log:
            compiled(s)
    assert len(backend.records) == 1
    torch.testing.assert_close(s["x"], x_before + 2)
    assert "aten._local_scalar_dense" in [what for what, _ in log.reads], log.reads


# ---------------------------------------------------------------------------------------------------- CompiledSOAP

SHAPES = [(6, 4), (6, 4), (5, 3), (7,)]  # two 2-D shapes (two buckets), one of them twice, and a 1-D parameter
STEPS, WARM_UP = 6, 4  # precondition_frequency=2: init, plain, refresh, plain | refresh, plain (logged)


def _run_soap(backend, log_steady_state: bool):
    """STEPS steps of CompiledSOAP compiled with `backend`; the last STEPS - WARM_UP inside a HostReadLog."""
    from compiled_soap import CompiledSOAP

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = CompiledSOAP(params, lr=1e-2, precondition_frequency=2, compile=True, backend=backend)
    kinds, log = [], None
    with contextlib.ExitStack() as stack:
        for step in range(STEPS):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            if step == WARM_UP and log_steady_state:
                log = stack.enter_context(HostReadLog())
            opt.step()
            kinds.append(opt.last_step_kind)
    return types.SimpleNamespace(params=params, opt=opt, kinds=kinds, log=log)


@pytest.fixture(scope="module")
def soap():
    backend = CaptureBackend()
    run = _run_soap(backend, log_steady_state=True)
    run.backend = backend
    run.records_after_warm_up = len(backend.records)
    return run


def test_compiled_soap_compiles_each_step_kind_once(soap):
    assert "plain" in soap.kinds and "refresh" in soap.kinds, soap.kinds
    records = soap.backend.records
    assert len(records) == 2, [r.name for r in records]  # one graph per step kind, nothing compiled twice
    assert all(r.forward_gm is not None for r in records)
    with_qr = [r.name for r in records if "aten.linalg_qr" in {n for n, _ in extern_ops(cuda_forward_graph(r).gm)}]
    assert len(with_qr) == 1, with_qr  # the refresh graph, and only it
    for r in records:
        print(r.name, graph_node_count(r), sorted({n for n, _ in extern_ops(cuda_forward_graph(r).gm)}))


def test_compiled_soap_capture_backend_matches_aot_eager(soap):
    reference = _run_soap("aot_eager", log_steady_state=False)
    assert reference.kinds == soap.kinds
    for p, q in zip(soap.params, reference.params):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for p, q in zip(soap.params, reference.params):
        state, ref = soap.opt.state[p], reference.opt.state[q]
        assert state.keys() == ref.keys()
        for key in state:
            for a, b in zip(torch.utils._pytree.tree_leaves(state[key]), torch.utils._pytree.tree_leaves(ref[key])):
                if isinstance(a, torch.Tensor):
                    torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"state[{key!r}]: {m}")
                else:
                    assert a == b, (key, a, b)


def test_compiled_soap_graphs_signature_and_devices(soap):
    for record in soap.backend.records:
        check_cuda_capturable(record, skip=("ops", "static_inputs"))


def test_compiled_soap_graphs_ops(soap):
    """No extern op outside the allow-list (no int64 accumulate, no eigh, no host sync) in either graph."""
    problems = {r.name: find_problems(r, ["ops"])["ops"] for r in soap.backend.records}
    assert not any(problems.values()), problems


def test_compiled_soap_mutated_inputs_static(soap):
    """Every state tensor the step mutates is a static input: on CUDA, replayed in place, never copied."""
    for record in soap.backend.records:
        assert [i for i in record.static_input_indices if not record.inputs[i].is_parameter], record.name
        check_mutated_inputs_static(record)


def test_compiled_soap_graphs_pass_every_check(soap):
    for record in soap.backend.records:
        check_cuda_capturable(record)


def test_compiled_soap_steady_state_compiled_steps_read_nothing(soap):
    assert len(soap.backend.records) == soap.records_after_warm_up  # the log did not make anything recompile
    assert soap.log.reads == [], soap.log.format()


def _eager_steady_state_reads(lr, scheduler=False):
    from compiled_soap import CompiledSOAP

    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = CompiledSOAP(params, lr=lr, precondition_frequency=2, compile=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.9**t) if scheduler else None

    def step():
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        if sched is not None:
            sched.step()

    for _ in range(WARM_UP):
        step()
    with HostReadLog() as log:
        for _ in range(STEPS - WARM_UP):
            step()
    return log


@pytest.mark.parametrize("lr,scheduler", [(1e-2, False), (1e-2, True), ("tensor", False), ("tensor", True)],
                         ids=["float", "float-scheduler", "tensor", "tensor-scheduler"])
def test_compiled_soap_eager_steady_state_reads_nothing(lr, scheduler):
    """Steady-state steps (plain and refresh) read no device value on the host: with a float lr, a tensor lr, and
    a scheduler changing either at every step."""
    log = _eager_steady_state_reads(torch.tensor(1e-2) if lr == "tensor" else lr, scheduler)
    assert log.reads == [], log.format()
