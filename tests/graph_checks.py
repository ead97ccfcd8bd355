"""Test helpers: show on a CPU-only machine that compiled step graphs would be captured as CUDA graphs by Inductor,
and that the host does not read device values. A helper module for tests, not a test file.

    backend = CaptureBackend()
    fn = torch.compile(step, fullgraph=True, dynamic=False, backend=backend)  # or CompiledSOAP(..., backend=backend)
    fn(...)                          # computes what backend="aot_eager" computes, and records each compiled graph
    for record in backend.records:
        check_cuda_capturable(record)         # AssertionError naming every violated precondition

    fn(...)                                   # warm-up: compile before logging
    with HostReadLog() as log:
        fn(...)
    assert not log.reads, log.format()

What `check_cuda_capturable` checks (CHECKS; `find_problems` returns them per check):

* "signature", from the recorded compilation (the ViewAndMutationMeta Inductor reads from TracingContext): no
  Python-number inputs, no outputs (the step returns None; with keep_inference_input_mutations the input mutations
  are copy_ nodes inside the graph), no metadata/storage mutation of an input, no effect tokens.
* "devices": the recorded ATen forward graph is replayed with make_fx under a FakeTensorMode whose inputs stand for
  CUDA tensors (same shapes, strides, storage offsets and aliasing), through Inductor's decomposition table
  (`cuda_forward_graph`). `torch._inductor.cudagraph_utils.check_multiple_devices_or_any_cpu_nodes` then runs on the
  device -> first node map that Inductor's GraphLowering would build (every buffer, every input with users; no
  empty CPU buffers), with graph partitioning off: one graph is the goal, not a graph cut around CPU ops.
  A graph traced on the CPU no longer tells "the device of the inputs" (`torch.zeros(n, device=x.device)`) from "the
  CPU", so the replay moves every CPU device argument and tensor constant to the GPU, and `cpu_intent` finds in the
  Dynamo graph (where the difference is still visible) what makes a CPU tensor on a GPU machine too: `.cpu()`, a
  "cpu" string as a device, a factory without a device (`torch.tensor(1.0)`). A torch.device object counts as the
  inputs' device: that is what `t.device` becomes in the Dynamo graph.
  On a CPU-only build the fake tensors are on the meta device, renamed cuda:0 for Inductor's check: the Python
  bindings that take a device guard (indexing, Tensor.copy_; the decompositions use them) cannot run on "cuda"
  tensors there, not even fake ones. Fake tensors run the same meta kernels whatever their device.
* "ops": `torch._inductor.utils.get_first_incompatible_cudagraph_node` is None; no op of HOST_SYNC_OPS; every op
  that Inductor runs as an ATen/extern call (a registered fallback, an op without a lowering, an index_put that
  accumulates into int64/bool) is in ALLOWED_EXTERN_OPS.
* "static_inputs": every mutated input is in `static_input_indices` (an nn.Parameter, or marked with
  `torch._dynamo.mark_static_address`) and 16-byte aligned (`tensor_is_aligned`), else cudagraph trees skip the graph
  ("mutated inputs").

Every torch-internal function the checks use is looked up at call time and its absence raises (RuntimeError), so a
torch release that moves one fails these checks instead of skipping them. Run on torch 2.13 (CPU build); the APIs
used also exist in 2.11, which was not run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import threading
import traceback
from collections import Counter
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.fx
import torch.fx.traceback
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "ALLOWED_EXTERN_OPS",
    "CHECKS",
    "HOST_SYNC_OPS",
    "CaptureBackend",
    "GraphRecord",
    "HostReadLog",
    "InputSpec",
    "NodeCount",
    "check_cuda_capturable",
    "check_mutated_inputs_static",
    "cpu_intent",
    "cuda_forward_graph",
    "extern_ops",
    "find_problems",
    "graph_node_count",
]

aten = torch.ops.aten

# Ops run as opaque ATen/cuBLAS/cuSOLVER calls inside the graph that are known (or, for linalg_qr, believed: see
# docs/design.md §2) not to synchronise with the host. Names are OpOverloadPacket names.
ALLOWED_EXTERN_OPS = frozenset({
    "aten.mm", "aten.bmm", "aten.addmm", "aten.baddbmm", "aten.addbmm", "aten._addmm_activation",
    "aten.linalg_qr", "aten.linalg_householder_product", "aten.geqrf",
    "aten.linalg_cholesky_ex", "aten.linalg_solve_triangular", "aten.triangular_solve",
    "aten.sort", "aten.argsort", "aten.topk", "aten.gather", "aten.index_select", "aten.scatter",
})

# Ops whose CUDA kernels read device values on the host (a sync, or a data-dependent output shape).
HOST_SYNC_OPS = frozenset({
    "aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal", "aten.nonzero", "aten.masked_select",
    "aten._unique2", "aten.unique_dim", "aten.unique_consecutive", "aten.linalg_eigh", "aten._linalg_eigh",
    "aten.linalg_eigvalsh", "aten._linalg_check_errors", "aten.linalg_cholesky", "aten.cholesky",
    "aten.linalg_inv", "aten.linalg_solve", "aten.linalg_svd", "aten._linalg_svd", "aten.bincount",
})

_CUDA = torch.device("cuda", 0)
_patch_lock = threading.RLock()  # serialises patching and restoring torch.Tensor methods


def _require(module: Any, name: str) -> Any:
    """A torch-internal function this module relies on; fail loudly (never skip a check) when it is gone."""
    fn = getattr(module, name, None)
    if fn is None:
        raise RuntimeError(f"graph_checks: {module.__name__}.{name} is missing in torch {torch.__version__}; "
                           "the CUDA-graph checks cannot run and need updating for this version")
    return fn


# ---------------------------------------------------------------------------------------------------- recording


class InputSpec(NamedTuple):
    """What the replay needs to know of one graph input (the tensor itself is not kept alive)."""

    name: str  # the Dynamo placeholder's name, e.g. "l_buckets_0_exp_avg_"
    is_tensor: bool
    shape: tuple
    stride: tuple
    storage_offset: int
    dtype: Optional[torch.dtype]
    device: Optional[torch.device]
    storage_key: Optional[int]  # inputs with the same key share storage
    storage_numel: int  # elements of the storage this input can reach (max over inputs sharing it)
    python_scalar: bool  # a Python number passed to the graph (as itself, or wrapped in a tensor by Dynamo)
    value: Any  # the value for Python scalars, else None
    is_parameter: bool  # an nn.Parameter (Dynamo marks those static itself)


@dataclasses.dataclass
class GraphRecord:
    """One graph compiled through `CaptureBackend`."""

    index: int  # order of compilation within the backend
    name: Optional[str]  # the compiled function's name (from the graph's stack traces), best effort
    dynamo_gm: torch.fx.GraphModule  # the torch-level graph Dynamo traced
    inputs: list  # InputSpec per Dynamo graph input
    grad_enabled: bool
    forward_gm: Optional[torch.fx.GraphModule] = None  # the ATen forward graph aot_autograd produced (CPU)
    forward_inputs: Optional[list] = None  # its (fake) example inputs
    fw_metadata: Any = None  # ViewAndMutationMeta of that compilation
    _cuda: Any = None  # cached result of cuda_forward_graph

    @property
    def static_input_indices(self) -> list:
        return list(self.fw_metadata.static_input_indices or [])

    @property
    def mutated_input_indices(self) -> list:
        return [i for i, info in enumerate(self.fw_metadata.input_info) if info.mutates_data]

    def input_name(self, i: int) -> str:
        return self.inputs[i].name if i < len(self.inputs) else f"input {i}"


def _hint(v):
    """A size as the example had it: a symbolic size (a per-kind graph, compile_per="kind") by its example value,
    read without adding a guard to its shape environment."""
    return v.node.hint if isinstance(v, torch.SymInt) else v


def _input_specs(gm: torch.fx.GraphModule, example_inputs) -> list:
    """Per input, what a replay needs; symbolic sizes are replaced by the example's (the graph is replayed at the
    sizes it was traced with)."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    layout = {}
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            layout[id(x)] = (tuple(_hint(s) for s in x.shape), tuple(_hint(s) for s in x.stride()),
                             _hint(x.storage_offset()))
    reach: dict = {}
    for x in example_inputs:
        if not isinstance(x, torch.Tensor):
            continue
        shape, stride, offset = layout[id(x)]
        key = _storage_key(x)
        end = offset + 1 + sum((n - 1) * st for n, st in zip(shape, stride) if n > 0)
        if math.prod(shape) == 0:
            end = offset
        reach[key] = max(reach.get(key, 0), end)
    specs = []
    for i, x in enumerate(example_inputs):
        node = placeholders[i] if i < len(placeholders) else None
        name = node.name if node is not None else f"arg{i}"
        grapharg = node.meta.get("grapharg") if node is not None else None
        wrapped = bool(getattr(grapharg, "pass_arg_as_tensor", False))
        if isinstance(x, torch.Tensor):
            key = _storage_key(x)
            shape, stride, offset = layout[id(x)]
            specs.append(InputSpec(name, True, shape, stride, offset, x.dtype, x.device, key, reach[key], wrapped,
                                   None, isinstance(x, torch.nn.Parameter)))
        else:
            specs.append(InputSpec(name, False, (), (), 0, None, None, None, 0, True, _hint(x), False))
    return specs


def _storage_key(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage()._cdata
    except Exception:  # a tensor without storage (some subclass): treat it as alone
        return id(t)


def _graph_function_name(gm: torch.fx.GraphModule) -> Optional[str]:
    """The compiled function's name: the outermost frame of the nodes' stack traces."""
    for node in gm.graph.nodes:
        trace = node.meta.get("stack_trace")
        if trace:
            m = re.search(r'File "[^"]*", line \d+, in (\S+)', trace)
            if m:
                return m.group(1)
    return None


class CaptureBackend:
    """A `torch.compile` backend that records every graph and runs it like backend="aot_eager".

    The graph goes through aot_autograd with `keep_inference_input_mutations=True` (as Inductor does, so input
    mutations stay in the graph as `copy_`), without decompositions or code generation, so it computes exactly what
    "aot_eager" computes. `records` holds one `GraphRecord` per compiled graph (a recompilation adds one).
    """

    def __init__(self):
        self.records: list[GraphRecord] = []
        self.__name__ = "CaptureBackend"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, **kwargs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        record = GraphRecord(index=len(self.records), name=_graph_function_name(gm), dynamo_gm=gm,
                             inputs=_input_specs(gm, example_inputs), grad_enabled=torch.is_grad_enabled())
        self.records.append(record)

        def forward_compiler(fw_gm, fw_inputs):
            context = torch._guards.TracingContext.try_get()
            if record.forward_gm is None:  # the forward (or inference) graph; a backward graph is not recorded
                record.forward_gm, record.forward_inputs = fw_gm, list(fw_inputs)
                record.fw_metadata = getattr(context, "fw_metadata", None)
            return make_boxed_func(fw_gm.forward)

        def backward_compiler(bw_gm, bw_inputs):
            return make_boxed_func(bw_gm.forward)

        compiled = aot_autograd(fw_compiler=forward_compiler, bw_compiler=backward_compiler,
                                keep_inference_input_mutations=True)(gm, example_inputs, **kwargs)
        if record.fw_metadata is None:
            raise RuntimeError("CaptureBackend: aot_autograd ran without TracingContext.fw_metadata; "
                               f"torch {torch.__version__} is not supported by graph_checks")
        return compiled

    def by_name(self, name: str) -> list:
        return [r for r in self.records if r.name == name]


# ---------------------------------------------------------------------------------------------------- counting


class NodeCount(NamedTuple):
    dynamo: int  # all nodes of the Dynamo graph
    dynamo_ops: int  # its call_function / call_method / call_module nodes
    aten: int  # all nodes of the ATen forward graph (as compiled on the CPU)
    aten_ops: int  # its call_function nodes


def graph_node_count(record: GraphRecord) -> NodeCount:
    calls = ("call_function", "call_method", "call_module")
    dyn = list(record.dynamo_gm.graph.nodes)
    fw = list(record.forward_gm.graph.nodes)
    return NodeCount(len(dyn), sum(n.op in calls for n in dyn), len(fw), sum(n.op == "call_function" for n in fw))


# ---------------------------------------------------------------------------------------------------- cuda replay

# torch-level factories that, without a device argument, make a tensor on the default device: the CPU, on a GPU
# machine too.
_DEFAULT_DEVICE_FACTORIES = {
    getattr(torch, name) for name in (
        "tensor", "as_tensor", "asarray", "scalar_tensor", "zeros", "ones", "empty", "full", "arange", "eye",
        "linspace", "logspace", "rand", "randn", "randint", "randperm", "empty_strided", "from_numpy")
    if hasattr(torch, name)
}


def _is_cpu_string(a) -> bool:
    return isinstance(a, str) and (a == "cpu" or a.startswith("cpu:"))


def cpu_intent(record: "GraphRecord") -> list:
    """(description, node) for each place of the Dynamo graph that makes a CPU tensor whatever the inputs' device:
    `.cpu()`, a "cpu" string as a device, a factory without a device argument (the default device; code that relies
    on torch.set_default_device("cuda") is reported too)."""
    found = []
    for node in record.dynamo_gm.graph.nodes:
        if node.op == "call_method" and node.target == "cpu":
            found.append(("Tensor.cpu()", node))
            continue
        if node.op not in ("call_method", "call_function"):
            continue
        leaves = []
        torch.fx.node.map_aggregate((node.args, node.kwargs), lambda a: leaves.append(a))
        if any(_is_cpu_string(a) for a in leaves):
            found.append((f"device 'cpu' given to {_callable_name(node)}", node))
        elif node.op == "call_function" and node.target in _DEFAULT_DEVICE_FACTORIES and \
                node.kwargs.get("device") is None:
            found.append((f"{_callable_name(node)} without a device (the default device, the CPU)", node))
    return found


def _callable_name(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    mod = getattr(node.target, "__module__", None) or ""
    name = getattr(node.target, "__name__", str(node.target))
    return f"{'torch.' if mod.startswith('torch') else ''}{name}"


def _replay_device() -> torch.device:
    """Where the replay puts "the GPU". A CPU-only build cannot run the Python bindings that take a device guard
    (indexing, Tensor.copy_, ..., also used by the decompositions) on "cuda" tensors, not even on fake ones; there
    the meta device stands in for cuda:0 (fake tensors run the same meta kernels for both) and is named cuda:0 again
    in the device check."""
    return _CUDA if torch.cuda.is_available() else torch.device("meta")


def _to_gpu(a):
    if isinstance(a, torch.device) and a.type == "cpu":
        return _replay_device()
    return a


class _OnCuda(torch.fx.Interpreter):
    """Runs an ATen graph traced on the CPU as if on cuda: device arguments "cpu" become cuda:0, tensor constants
    become fake cuda tensors of the same shape. (Where a graph means the CPU, `cpu_intent` finds it in the Dynamo
    graph; an ATen graph traced on the CPU no longer tells "the tensors' device" from "the CPU".)"""

    def __init__(self, gm, constants: dict):
        super().__init__(gm)
        self._constants = constants

    def get_attr(self, target, args, kwargs):
        if target in self._constants:
            return self._constants[target]
        return super().get_attr(target, args, kwargs)

    def call_function(self, target, args, kwargs):
        args = torch.fx.node.map_aggregate(args, _to_gpu)
        kwargs = torch.fx.node.map_aggregate(kwargs, _to_gpu)
        return super().call_function(target, args, kwargs)


def _fake_cuda_inputs(record: "GraphRecord", mode) -> list:
    """Fake cuda stand-ins of the forward graph's inputs: same shapes, strides, storage offsets and aliasing.
    Tensors Dynamo made from Python numbers stay on the CPU (where they would be on a GPU machine too)."""
    specs = _input_specs(record.forward_gm, record.forward_inputs)
    from_python = [s.python_scalar for s in record.inputs] if len(record.inputs) == len(specs) else []
    bases: dict = {}
    out = []
    with mode:
        for i, spec in enumerate(specs):
            if not spec.is_tensor:
                if not isinstance(spec.value, (int, float, bool)):
                    raise AssertionError(f"graph {_label(record)}: input {i} is {spec.value!r}; symbolic inputs "
                                         "cannot be replayed (compile with dynamic=False)")
                out.append(spec.value)
                continue
            device = torch.device("cpu") if (from_python and from_python[i]) else _replay_device()
            key = (spec.storage_key, device)
            if key not in bases:
                bases[key] = torch.empty(max(spec.storage_numel, 1), dtype=spec.dtype, device=device)
            base = bases[key]
            if base.dtype != spec.dtype:
                raise AssertionError(f"graph {_label(record)}: input {i} shares storage with an input of another "
                                     "dtype; this aliasing cannot be replayed")
            out.append(base.as_strided(spec.shape, spec.stride, spec.storage_offset))
    return out


class CudaForward(NamedTuple):
    gm: torch.fx.GraphModule  # the ATen forward graph re-traced with fake cuda inputs and Inductor's decompositions
    inputs: list  # its fake cuda inputs


def cuda_forward_graph(record: "GraphRecord") -> CudaForward:
    """The recorded ATen forward graph replayed by make_fx under a FakeTensorMode with its inputs on cuda, through
    Inductor's decomposition table: the graph Inductor would lower if the step ran on a GPU."""
    if record._cuda is not None:
        return record._cuda
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    gm = record.forward_gm
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    inputs = _fake_cuda_inputs(record, mode)
    constants = {}
    with mode:
        for node in gm.graph.find_nodes(op="get_attr"):
            value = getattr(gm, node.target, None)
            if isinstance(value, torch.Tensor):
                constants[node.target] = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype,
                                                             device=_replay_device())

    def run(*args):
        return _OnCuda(gm, constants).run(*args)

    try:
        with mode, torch.set_grad_enabled(record.grad_enabled), torch.fx.traceback.preserve_node_meta():
            traced = make_fx(run, decomposition_table=select_decomp_table(), tracing_mode="real")(*inputs)
    except Exception as e:
        device = "cuda:0" if _replay_device() == _CUDA else "the meta device, standing in for cuda:0"
        raise AssertionError(f"graph {_label(record)}: replaying it with its inputs on {device} failed; on a GPU it "
                             "would fail the same way unless the cause below is a limit of the replay:\n"
                             f"{type(e).__name__}: {e}") from e
    record._cuda = CudaForward(traced, inputs)
    return record._cuda


# ---------------------------------------------------------------------------------------------------- checks


def _label(record: GraphRecord) -> str:
    return f"#{record.index} {record.name!r}"


def _where(node: torch.fx.Node) -> str:
    """The user line a node came from: the last 'File ..., line ..., in ...' of its stack trace and its code."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File "):
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
            return f"{lines[i]}: {code}".rstrip(": ")
    return "(no stack trace)"


def _op_name(target) -> str:
    packet = getattr(target, "overloadpacket", target)
    return str(packet)


def _device_node_mapping(gm: torch.fx.GraphModule) -> dict:
    """Device -> first node, as Inductor's GraphLowering collects it: every buffer a node produces, and inputs that
    have users; CPU buffers without elements do not count."""
    mapping: dict = {}
    for node in gm.graph.nodes:
        if node.op == "output" or (node.op == "placeholder" and not node.users):
            continue
        val = node.meta.get("val")
        for v in torch.utils._pytree.tree_leaves(val):
            if not isinstance(v, torch.Tensor):
                continue
            device = v.device
            if device == _replay_device() or (device.type == "cuda" and device.index is None):
                device = _CUDA
            if node.op != "placeholder" and device.type == "cpu" and v.numel() == 0:
                continue
            mapping.setdefault(device, node)
    return mapping


def _index_put_falls_back(node: torch.fx.Node) -> Optional[torch.dtype]:
    if _op_name(node.target) not in ("aten.index_put", "aten.index_put_", "aten._unsafe_index_put"):
        return None
    accumulate = node.kwargs.get("accumulate", node.args[3] if len(node.args) > 3 else False)
    if not accumulate:
        return None
    from torch._inductor import utils as inductor_utils

    needs_fallback = _require(inductor_utils, "needs_fallback_due_to_atomic_add_limitations")
    dtype = node.args[0].meta["val"].dtype
    return dtype if needs_fallback(dtype) else None


def extern_ops(graph: torch.fx.GraphModule) -> list:
    """(op name, node) for each node Inductor would run as an ATen/extern call instead of generating code."""
    from torch._inductor import lowering

    lowerings = _require(lowering, "lowerings")
    fallbacks = _require(lowering, "fallbacks")
    out = []
    for node in graph.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        name = _op_name(node.target)
        if node.target in fallbacks or node.target not in lowerings:
            out.append((name, node))
        elif (dtype := _index_put_falls_back(node)) is not None:
            out.append((f"{name} (accumulate into {dtype}: Inductor falls back to the ATen kernel)", node))
    return out


class _Problems:
    """Problem lines of one check; the same problem at several nodes becomes one line naming them all."""

    def __init__(self):
        self._lines: dict = {}

    def add(self, text: str, node: Optional[torch.fx.Node] = None) -> None:
        where = f"{_where(node)}" if node is not None else ""
        self._lines.setdefault((text, where), []).append(node.name if node is not None else None)

    def lines(self) -> list:
        out = []
        for (text, where), names in self._lines.items():
            names = [n for n in names if n]
            if names:
                text += f" (node{'s' if len(names) > 1 else ''} {', '.join(names)}; {where})"
            out.append(text)
        return out


def _signature_problems(record: GraphRecord) -> list:
    """What the graph takes and gives: no Python numbers in, nothing out, no metadata mutation, no effect tokens."""
    meta = record.fw_metadata
    found = _Problems()
    if getattr(meta, "tokens", None):
        found.add(f"the graph threads {len(meta.tokens)} effect token(s) (side-effecting ops)")
    for spec in record.inputs:
        if spec.python_scalar:
            what = f"value {spec.value!r}" if not spec.is_tensor else "passed by Dynamo as a CPU scalar tensor"
            found.add(f"Python-number input {spec.name} ({what}): a changing number recompiles or becomes a CPU "
                      "tensor; keep it in a device tensor updated in place")
    if meta.output_info:
        kinds = ", ".join(str(o.output_type) for o in meta.output_info)
        found.add(f"the graph returns {len(meta.output_info)} output(s) ({kinds}); a step must return None")
    outputs = torch.utils._pytree.tree_leaves(record.forward_gm.graph.find_nodes(op="output")[0].args)
    if outputs and not meta.output_info:
        found.add(f"the forward graph has {len(outputs)} output(s) besides the user's (input mutations applied "
                  "outside the graph): " + ", ".join(str(o) for o in outputs[:8]))
    for i, info in enumerate(meta.input_info):
        if info.mutates_metadata or getattr(info, "mutates_storage_metadata", False):
            found.add(f"input {record.input_name(i)} has its metadata or storage mutated (resize_/set_/as_strided_)")
    return found.lines()


def _device_problems(record: GraphRecord) -> list:
    """One device, CUDA, and no CPU tensor: `cpu_intent` on the Dynamo graph, then Inductor's own check."""
    from torch._inductor import cudagraph_utils

    check_devices = _require(cudagraph_utils, "check_multiple_devices_or_any_cpu_nodes")
    found = _Problems()
    for what, node in cpu_intent(record):
        found.add(f"makes a CPU tensor (on a GPU machine too): {what}", node)
    gm = cuda_forward_graph(record).gm
    # With partitioning Inductor would cut the step around CPU ops instead of refusing it: one graph is the goal.
    with torch._inductor.config.patch(graph_partition=False):
        reason = check_devices(dict(_device_node_mapping(gm)))
    if reason:
        found.add(f"check_multiple_devices_or_any_cpu_nodes: {reason.strip()}")
    return found.lines()


def _op_problems(record: GraphRecord) -> list:
    """No op that Inductor refuses in a CUDA graph, no host sync, no extern op outside ALLOWED_EXTERN_OPS."""
    from torch._inductor import utils as inductor_utils

    first_incompatible = _require(inductor_utils, "get_first_incompatible_cudagraph_node")
    gm = cuda_forward_graph(record).gm
    found = _Problems()
    node = first_incompatible(gm)
    if node is not None:
        found.add(f"get_first_incompatible_cudagraph_node: {node.target}", node)
    for node in gm.graph.nodes:
        if node.op == "call_function" and _op_name(node.target) in HOST_SYNC_OPS:
            found.add(f"host-sync op {node.target}", node)
    for name, node in extern_ops(gm):
        base = name.split(" ")[0]
        if base in HOST_SYNC_OPS:
            continue  # named above
        if base not in ALLOWED_EXTERN_OPS or " (" in name:
            found.add(f"extern op not in ALLOWED_EXTERN_OPS: {name}", node)
    return found.lines()


def _static_input_problems(record: GraphRecord) -> list:
    """Every mutated input static (an nn.Parameter, or marked with mark_static_address) and 16-byte aligned."""
    from torch._inductor import utils as inductor_utils

    is_aligned = _require(inductor_utils, "tensor_is_aligned")
    static = set(record.static_input_indices)
    mutated = record.mutated_input_indices
    found = _Problems()
    not_static = [record.input_name(i) for i in mutated if i not in static]
    if not_static:
        found.add(f"{len(not_static)} of {len(mutated)} mutated inputs are not static (neither an nn.Parameter nor "
                  "marked with torch._dynamo.mark_static_address), so cudagraph trees would skip the graph for "
                  "'mutated inputs': " + ", ".join(not_static))
    inputs = cuda_forward_graph(record).inputs
    unaligned = [record.input_name(i) for i in mutated if i in static and i < len(inputs)
                 and isinstance(inputs[i], torch.Tensor) and not is_aligned(inputs[i])]
    if unaligned:
        found.add("mutated static inputs whose storage offset is not 16-byte aligned (Inductor drops their static "
                  "status): " + ", ".join(unaligned))
    return found.lines()


_CHECKS = {
    "signature": _signature_problems,
    "devices": _device_problems,
    "ops": _op_problems,
    "static_inputs": _static_input_problems,
}
CHECKS = tuple(_CHECKS)


def find_problems(record: GraphRecord, checks=CHECKS) -> dict:
    """{check name: [problem, ...]} for the named checks (see CHECKS); an empty list where a check passes."""
    unknown = set(checks) - set(_CHECKS)
    if unknown:
        raise ValueError(f"unknown checks {sorted(unknown)}; known: {CHECKS}")
    return {name: _CHECKS[name](record) for name in checks}


def _raise(record: GraphRecord, problems: dict) -> None:
    lines = [f"[{name}] {line}" for name, found in problems.items() for line in found]
    if lines:
        raise AssertionError(f"graph {_label(record)} would not be captured as one CUDA graph:\n  - "
                             + "\n  - ".join(lines))


def check_cuda_capturable(record: GraphRecord, *, skip=()) -> None:
    """Assert Inductor's CUDA-graph preconditions for one recorded graph: every check of CHECKS except those in
    `skip`. The AssertionError names every violation, the op and the source line where there is one."""
    _raise(record, find_problems(record, [c for c in CHECKS if c not in skip]))


def check_mutated_inputs_static(record: GraphRecord) -> None:
    """Only the "static_inputs" check: every input the graph mutates is static and aligned."""
    _raise(record, find_problems(record, ["static_inputs"]))


# ---------------------------------------------------------------------------------------------------- host reads


_READ_OPS = {
    "aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal", "aten.nonzero",
    "aten.masked_select", "aten._unique2", "aten.unique_dim", "aten.unique_consecutive",
}
_COPY_OPS = {"aten._to_copy", "aten.copy_", "aten._copy_from", "aten.copy"}
_PATCHED_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


_THIS_FILE = os.path.abspath(__file__)


def _short_stack(limit: int = 3) -> str:
    """The innermost `limit` frames outside torch, pytest and this module, innermost first."""
    frames = []
    for f in traceback.extract_stack():
        path = f.filename.replace("\\", "/")
        if os.path.abspath(f.filename) == _THIS_FILE or any(d in path for d in ("/torch/", "/_pytest/", "/pluggy/")):
            continue
        frames.append(f)
    return " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames[-limit:]))


def _copy_devices(name: str, args, kwargs):
    """(source tensor, destination device) of a copy op."""
    if name == "aten._to_copy":
        device = kwargs.get("device")
        return args[0], torch.device(device) if device is not None else args[0].device
    if name == "aten._copy_from":  # _copy_from(self=source, dst)
        return args[0], args[1].device
    return args[1], args[0].device  # copy_(self=destination, src), copy(self, src)


def _compiling() -> bool:
    """Whether Dynamo is compiling a frame (it does so inside convert_frame; a compiled frame runs outside it)."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        if name.endswith("/_dynamo/convert_frame.py"):
            return True
        frame = frame.f_back
    return False


class _ReadMode(TorchDispatchMode):
    def __init__(self, log: "HostReadLog"):
        super().__init__()
        self.log = log

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # Lets Dynamo run compiled frames while the mode is active (otherwise a frame is skipped: "non-infra torch
        # dispatch mode present", an error with fullgraph=True).
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        if not self.log._in_method():
            if name in _READ_OPS:
                self.log._add(name)
            elif name in _COPY_OPS:
                src, dst_device = _copy_devices(name, args, kwargs)
                if (isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta")
                        and dst_device.type == "cpu"):
                    self.log._add(f"{name} {src.device}->cpu")
        return func(*args, **kwargs)


class HostReadLog:
    """Records every read of a tensor's data by the host while active: `.reads` is a list of (what, where).

    Two layers: `torch.Tensor.item/tolist/__bool__/__float__/__int__/__index__` are wrapped (log, then the original;
    restored on exit) and a TorchDispatchMode logs the ATen ops that read device data (`_local_scalar_dense`,
    `is_nonzero`, `equal`, `nonzero`, ... and device->CPU copies). A read through a wrapped method is logged once,
    under the method's name. On a CPU-only machine every `_local_scalar_dense` counts: all tensors are on the CPU,
    but the same code reads a device value on a GPU.

    With compiled functions (measured on torch 2.13 with aot_eager and CaptureBackend; tests/test_graph_checks.py):
    * A plain TorchDispatchMode makes Dynamo skip every frame ("non-infra torch dispatch mode present"), so a
      fullgraph=True function raises and any other runs eagerly. This mode declares `ignore_compile_internals()`:
      Dynamo then runs the compiled graph as usual (no recompilation, same results), and the mode sees the ATen ops
      that the compiled artifact itself dispatches at run time (all of an aot_eager graph, e.g. a captured
      `_local_scalar_dense`; presumably only the extern calls of Inductor code) and Dynamo's guards (a guard that
      reads a tensor value is logged: it is a real read at every call).
    * Reads made by Dynamo while it compiles (fake-tensor conversion reads 0-d tensors) are not logged.
    * Still, warm up (compile) before entering: a function compiled inside the log may trace into the method
      wrappers and break its graph differently than without the log.
    Not measured: Inductor with CUDA graphs (no GPU here). The method wrappers see every thread, the dispatch mode
    only the thread that entered the log.
    """

    def __init__(self, stack_limit: int = 3):
        self.reads: list[tuple[str, str]] = []
        self._stack_limit = stack_limit
        self._mode: Optional[_ReadMode] = None
        self._saved: dict = {}
        self._depth = threading.local()

    # -- bookkeeping
    def _in_method(self) -> bool:
        return getattr(self._depth, "n", 0) > 0

    def _add(self, what: str) -> None:
        if _compiling():
            return  # torch.compile reading values while it compiles (fake-tensor conversion of constants)
        self.reads.append((what, _short_stack(limit=self._stack_limit)))

    def _wrap(self, name: str, original: Callable) -> Callable:
        log = self

        def wrapper(tensor, *args, **kwargs):
            if not log._in_method():
                log._add(f"Tensor.{name}")
            log._depth.n = getattr(log._depth, "n", 0) + 1
            try:
                return original(tensor, *args, **kwargs)
            finally:
                log._depth.n -= 1

        wrapper.__name__ = name
        wrapper.__qualname__ = f"Tensor.{name}"
        return wrapper

    # -- context manager
    def __enter__(self) -> "HostReadLog":
        with _patch_lock:
            for name in _PATCHED_METHODS:
                self._saved[name] = torch.Tensor.__dict__.get(name)
                setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        self._mode = _ReadMode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._mode.__exit__(*exc)
        finally:
            self._mode = None
            with _patch_lock:
                for name, old in self._saved.items():
                    if old is None:
                        delattr(torch.Tensor, name)
                    else:
                        setattr(torch.Tensor, name, old)
                self._saved.clear()

    # -- results
    def counts(self) -> Counter:
        return Counter(what for what, _ in self.reads)

    def format(self) -> str:
        if not self.reads:
            return "no host reads"
        lines = Counter(self.reads)
        return "\n".join(f"{n} x {what} at {where}" for (what, where), n in lines.items())
