"""compile_per="kind": one compiled function per kind of bucket, whatever its sizes (issue 27, docs/design.md §7).

Against independent computations: the same run eagerly (compile=False, float64 within tests/agreement.py's bound),
the reference SOAP (Inductor), a resume (bitwise: same process, same artifacts). And what makes it worth having,
counted: buckets of one kind share one artifact, a new plan reuses the artifacts of its kinds, and the refresh
artifacts exist before the first refresh is due.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from agreement import agree
from conftest import full_rank_grads, make_params, relative_deviation, train
from compiled_soap import SOAP, CompiledSOAP, stacked
from compiled_soap.kinds import KindCompiler
from graph_checks import CaptureBackend, HostReadLog, check_cuda_capturable

pytestmark = pytest.mark.xdist_group("per_kind")  # one worker: its tests share the process's compiled kinds

# Three 2-D buckets of one kind (two of B = 2 and a B = 1 one, different sizes), two 1-D buckets (B = 1 and B = 2),
# a merged channels_last 4-D bucket (B = 1, its kind's only bucket). The B = 1 buckets run their kind's B = 2 artifact.
SHAPES = [(6, 4), (6, 4), (5, 3), (5, 3), (5,), (7, 3), (4,), (4,), (2, 3, 4, 5)]
KINDS = 3


def _groups(params):
    return [{"params": params[:-1]},
            {"params": params[-1:], "lr": 1e-2, "merge_dims": True, "data_format": "channels_last",
             "max_precond_dim": 12}]


def _kinds(opt) -> int:
    return opt._compiler._kinds.kinds


def _with_gaps(params, call):
    """full_rank_grads, with a missing gradient at call 4 and a non-finite one at call 6 (both skipped)."""
    grads = full_rank_grads(params, call)
    if call == 4:
        grads[0] = None
    if call == 6:
        grads[2][0, 0] = float("nan")
    return grads


def test_per_kind_matches_eager_and_shares_artifacts_across_sizes():
    start = make_params(SHAPES, torch.float64)
    want = make_params(SHAPES, torch.float64)
    train(CompiledSOAP(_groups(want), precondition_frequency=3, compile=False), want, 10, _with_gaps)
    got = make_params(SHAPES, torch.float64)
    opt = CompiledSOAP(_groups(got), precondition_frequency=3, backend="aot_eager", compile_per="kind")
    train(opt, got, 2, _with_gaps)
    # The first compiling call (call 2) compiled the plain and the refresh function of every kind: 6 buckets,
    # 3 kinds (the (6, 4), (5, 3) and (7, 3) buckets share theirs, the (5,) and (4,) ones theirs), no compile left
    # for the first refresh (call 4).
    assert _kinds(opt) == 2 * KINDS
    train(opt, got, 8, _with_gaps, start=2)
    assert _kinds(opt) == 2 * KINDS
    print(agree(got, want, start))
    # What compile_per="auto" counts before compiling anything: the kinds the artifacts were compiled for.
    plain = (False,) * len(opt._plans)
    calls = stacked.bucket_calls(opt._plans, opt._bucket_tensors, opt._hyper.hyper, plain, "householder")
    assert opt._compiler.count_kinds(stacked.bucket_step, calls, batched=1) == KINDS


def test_per_kind_resume_is_bitwise_and_a_new_plan_reuses_the_kinds():
    params = make_params(SHAPES, torch.float64)
    opt = CompiledSOAP(_groups(params), precondition_frequency=3, backend="aot_eager", compile_per="kind")
    train(opt, params, 5)
    saved, saved_params = opt.state_dict(), [p.detach().clone() for p in params]
    train(opt, params, 5, start=5)

    resumed = [torch.nn.Parameter(p.clone()) for p in saved_params]
    again = CompiledSOAP(_groups(resumed), precondition_frequency=3, backend="aot_eager", compile_per="kind")
    again.load_state_dict(saved)
    train(again, resumed, 5, start=5)
    assert all(torch.equal(a, b) for a, b in zip(resumed, params))

    # A late parameter of a known kind and a new size: a new plan, no new compile.
    late = make_params([(7, 4), (7, 4)], torch.float64, seed=3)
    kinds = _kinds(opt)
    opt.add_param_group({"params": late})
    train(opt, params + late, 6, start=10)
    assert _kinds(opt) == kinds


@pytest.mark.compile
def test_per_kind_inductor_matches_reference_with_one_artifact_for_four_buckets():
    """Inductor's code for one kind, traced with symbolic sizes, serves the (6, 4), (5, 3) and (4, 2) buckets and,
    with a batch of one in place of two, the (7, 3) one."""
    shapes = [(6, 4), (6, 4), (5, 3), (5, 3), (4, 2), (4, 2), (7, 3)]
    ref, fast = make_params(shapes), make_params(shapes)
    start = [p.detach().clone() for p in ref]
    train(SOAP(ref, precondition_frequency=2), ref, 6)
    opt = CompiledSOAP(fast, precondition_frequency=2, mode=None)  # compile_per="auto"
    train(opt, fast, 6)
    assert opt.compile_unit == "kind"  # four buckets of one kind, on the CPU with Inductor
    assert _kinds(opt) == 2  # plain and refresh, one kind
    assert relative_deviation(ref, fast, start) < 1e-5
    # The CUDA form on the CPU: the same artifacts as operators in one Inductor graph (reduce-overhead), bitwise.
    outer = make_params(shapes)
    opt = CompiledSOAP(outer, precondition_frequency=2, compile_per="kind")
    opt._compiler.outer_graph = True
    train(opt, outer, 6)
    assert all(torch.equal(a, b) for a, b in zip(outer, fast))


def test_kind_compiler_checks_what_the_trace_assumed_once_per_binding():
    """A size relation the trace branched on is checked when a call is bound: a call that breaks it gets an
    artifact traced at its exact sizes (an artifact itself checks nothing when it runs)."""
    def column_or_row_sums(x, out, *, scale):
        if x.shape[1] > x.shape[2]:
            out.copy_(x.sum(1) * scale)
        else:
            out.copy_(x.sum(2) * -scale)

    compiler = KindCompiler("aot_eager", {})
    counts = []
    for shape in [(3, 5, 4), (3, 7, 2), (3, 4, 6), (3, 6, 8)]:
        x = torch.randn(shape)
        wide = shape[1] > shape[2]
        out = torch.zeros(shape[0], shape[2] if wide else shape[1])
        artifact, tensors = compiler.bind(column_or_row_sums, {"scale": 3.0}, (x, out))
        artifact.run(*tensors)
        torch.testing.assert_close(out, x.sum(1) * 3 if wide else x.sum(2) * -3)
        counts.append(compiler.kinds)
    assert counts == [1, 1, 2, 3]  # artifacts used: (3, 7, 2) shares the first; the others are traced at their sizes


def test_kind_compiler_runs_a_batch_of_one_through_a_larger_batch_artifact():
    """`batched`: a call with a batch of one (bound after the larger ones, whatever the order given) runs the
    artifact traced for a batch of three; without it, the batch of one is a kind of its own (size 1 is a constant of
    a trace). Results against the eager function either way."""
    def scaled_row_sums(x, out, scale):
        out.copy_(x.sum(2) * scale)

    scale = torch.tensor([3.0])  # not batched: its size 1 stays a constant
    for batched, kinds in ((2, 1), (0, 2)):
        xs = [torch.randn(1, 5, 4), torch.randn(3, 6, 2), torch.randn(1, 2, 7)]
        calls = [({}, (x, torch.zeros(x.shape[:2]), scale)) for x in xs]
        compiler = KindCompiler("aot_eager", {})
        assert compiler.count_kinds(scaled_row_sums, calls, batched) == kinds
        for (_, (x, out, _)), (artifact, tensors) in zip(calls, compiler.bind_all(scaled_row_sums, calls, batched)):
            artifact.run(*tensors)
            torch.testing.assert_close(out, x.sum(2) * 3)
        assert compiler.kinds == kinds


def test_kind_compiler_keys_memory_layout_and_missing_leaves():
    def rotate(a, q, b):
        a.copy_(a @ q if b is None else a @ q + b)

    compiler = KindCompiler("aot_eager", {})
    for d in (5, 7):
        a, q = torch.randn(2, d, d), torch.randn(2, d, d)
        column_major = q.transpose(1, 2).contiguous().transpose(1, 2)
        for q_ in (q, column_major):  # two kinds
            for b in (None, torch.randn(2, d, d)):
                a_ = a.clone()
                artifact, tensors = compiler.bind(rotate, {}, (a_, q_, b))
                artifact.run(*tensors)
                torch.testing.assert_close(a_, a @ q_ if b is None else a @ q_ + b)
    assert compiler.kinds == 4


def test_compile_per_is_validated():
    with pytest.raises(ValueError, match="compile_per"):
        CompiledSOAP(make_params([(3, 2)]), compile_per="bucket")
    with pytest.raises(ValueError, match="householder-outside-graph.*compile_per='plan'"):
        CompiledSOAP(make_params([(3, 2)]), compile_per="kind", orthogonalization="householder-outside-graph")


def test_outer_graph_of_operators_matches_the_loop():
    """The CUDA form of a per-kind step, run on the CPU: each artifact an opaque operator whose schema says what it
    writes, the loop over buckets one compiled graph (backend aot_eager here) that holds those calls and nothing
    else. Bitwise the Python loop's result: the same artifacts on the same tensors."""
    loop, outer = make_params(SHAPES, torch.float64), make_params(SHAPES, torch.float64)
    train(CompiledSOAP(_groups(loop), precondition_frequency=3, backend="aot_eager", compile_per="kind"), loop, 7)
    opt = CompiledSOAP(_groups(outer), precondition_frequency=3, backend="aot_eager", compile_per="kind")
    opt._compiler.outer_graph = True
    counters.clear()
    train(opt, outer, 7)
    assert all(torch.equal(a, b) for a, b in zip(outer, loop))
    assert counters["stats"]["unique_graphs"] == 2  # plain and refresh outer graphs
    assert sum(counters["graph_break"].values()) == 0


@pytest.mark.parametrize("refresh", [False, True])
def test_each_operator_says_it_writes_exactly_the_state(refresh):
    """The schema of a kind's operator is what keeps an outer compiled graph from reordering or copying around it:
    it must name every tensor the step writes (the state) and no other (gradients, hyperparameters, frozen
    settings), read off the BucketTensors fields rather than off the trace."""
    params = make_params(SHAPES, torch.float64)
    opt = CompiledSOAP(_groups(params), precondition_frequency=3, backend="aot_eager", compile_per="kind")
    train(opt, params, 1)  # initialised: buckets exist, nothing compiled
    writes = {"params", "exp_avg", "exp_avg_sq", "factors", "step", "refresh_clock", "skipped"} | (
        {"eigenbases"} if refresh else set())
    calls = stacked.bucket_calls(opt._plans, opt._bucket_tensors, opt._hyper.hyper, (refresh,) * len(opt._plans),
                                 "householder")
    for kwargs, (b, hyper) in calls:
        artifact, _ = opt._compiler._kinds.bind(stacked.bucket_step, kwargs, (b, hyper))  # the kinds compiled above
        named = (stacked.BucketTensors(**{f: _named(f, getattr(b, f)) for f in b._fields}),
                 stacked.Hyper(**{f: f"hyper.{f}" for f in hyper._fields}))
        names = [n.split(".")[0] for n in torch.utils._pytree.tree_leaves(named) if n is not None]
        assert dict(zip(names, artifact.mutated)) == {n: n in writes for n in names}
        schema = artifact.op()._schema
        assert [a.alias_info is not None and a.alias_info.is_write for a in schema.arguments] == list(artifact.mutated)


def _named(field, value):
    if isinstance(value, tuple):  # factors, eigenbases: one name per axis, None where the axis has none
        return tuple(None if v is None else f"{field}.{i}" for i, v in enumerate(value))
    return field


def test_per_kind_graphs_pass_the_cuda_capture_checks_and_steady_steps_read_nothing():
    """tests/graph_checks.py on the CUDA form (outer graph of operators), run on the CPU: the outer graphs pass every
    check (static inputs, no Python scalars, nothing cudagraph-unsafe: what cudagraph trees need to record one CUDA
    graph per step), and each kind's graph, replayed at its example sizes, passes every check that applies to a
    graph running inside that capture (all but static inputs, which are the outer graph's). The steady steps read
    nothing on the host."""
    backend = CaptureBackend()
    params = make_params([(6, 4), (6, 4), (5, 3), (5, 3)])
    opt = CompiledSOAP(params, precondition_frequency=2, backend=backend, compile_per="kind")
    opt._compiler.outer_graph = True
    train(opt, params, 4)
    outer = backend.by_name("_call_each")
    assert len(outer) == 2  # plain and refresh
    for record in outer:
        check_cuda_capturable(record)
        # Functionalised, the graph is the operator calls (auto_functionalized), their results and the write-back
        # of the state into the static inputs (copy_), which Inductor turns back into calls in place: no other op.
        calls = [n for n in record.forward_gm.graph.nodes if n.op == "call_function"]
        wrapped = [n.args[0] for n in calls if "auto_functionalized" in str(n.target)]
        assert len(wrapped) == len(opt._plans) and all(str(op).startswith("compiled_soap_kinds.") for op in wrapped)
        others = {str(n.target) for n in calls if "auto_functionalized" not in str(n.target)}
        assert others <= {"<built-in function getitem>", "aten.copy_.default"}, others
    inner = [r for r in backend.records if r.name != "_call_each"]
    assert len(inner) == 2  # one kind: plain and refresh
    for record in inner:
        check_cuda_capturable(record, skip=("static_inputs",))
    # Host reads, watched op by op inside the artifacts: through the Python loop (the same artifacts; the outer
    # graph runs them inside a higher-order operator that a dispatch mode does not see into).
    looped = make_params([(6, 4), (6, 4), (5, 3), (5, 3)])
    opt = CompiledSOAP(looped, precondition_frequency=2, backend=backend, compile_per="kind")
    train(opt, looped, 4)
    compiled = len(backend.records)
    with HostReadLog() as log:
        train(opt, looped, 2, start=4)  # a plain and a refresh step
    assert log.reads == [], log.format()
    assert len(backend.records) == compiled  # nothing compiled again: the loop reused the kinds
