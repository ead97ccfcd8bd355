"""Which linear algebra captures into a CUDA graph on this GPU, and whether CompiledSOAP's graphs record once and
then only replay, alone and next to a model compiled with mode="reduce-overhead".

    python -m profiling.cuda_capture_check --outdir runs/capture          # parts a, b, c on the GPU (minutes)
    python -m profiling.cuda_capture_check --parts a --sizes 64,257 --batches 1,8
    python -m profiling.cuda_capture_check --parts b,c --methods cholesky
    python -m profiling.cuda_capture_check --dry-run                      # CPU: this script's own machinery

Part a, raw capture. For each op, size d and batch B: warm the op up on a side stream, capture it on a [B, d, d]
batch inside torch.cuda.graph, copy new data into the captured inputs, replay, and compare with the op run eagerly
on that data (bitwise, else the largest absolute difference). Ops: torch.linalg.qr (a probe: whether cuSOLVER's or
MAGMA's QR captures is what this finds out), torch.linalg.cholesky_ex (upper, with one indefinite matrix in every
batch of two or more, so the info path is captured too), torch.linalg.solve_triangular (upper, right side: X R^-1,
as CholeskyQR uses it) and compiled_soap.orthogonalization.cholesky. The last three are built to be graph-safe:
a failure there is a failure of this check.

Part b, the optimizer alone. For each orthogonalization method, CompiledSOAP (mode="reduce-overhead",
precondition_frequency --period) steps a small eager model for --steps-b steps under
torch._inductor.config.triton.cudagraph_or_error=True. Both step kinds are recorded within the first 2f+1 steps
(plain: compiled at step 2, recorded at 3; refresh: compiled at f+1, recorded at 2f+1); the remaining steps are the
measured steady state. Inductor's cudagraph counters (torch._dynamo.utils.counters["inductor"]: cudagraph_skips,
cudagraph_partitions, cudagraph_recorded_non_static_inputs) and the cudagraph tree's own calls (warm-ups,
recordings, replays, eager fallbacks, counted by wrapping CUDAGraphTreeManager's methods; unexpected re-records
from its num_rerecord) are printed at the start, before and after the measured steps. Steady state must show no
skip, no recording, no warm-up, no fallback and at least one replay per step; the parameters must be finite and
within 1e-3 of the same run with compile=False.

Part c, next to a compiled model. The same model under torch.compile(model, mode="reduce-overhead"), forward +
backward + opt.step() for --steps-c steps (torch.compiler.cudagraph_mark_step_begin() at the start of each, and
zero_grad(set_to_none=True) after the step), with the same checks, against the same loop with the uncompiled model:
losses and parameters within 1e-3.

A "householder" row in parts b and c only has to pass when QR captured in part a at every size tried (or when part
a did not run); --strict-qr makes QR capture itself required. Each op of part a and each (part, method) runs in its
own process, so that a capture failure that leaves the CUDA context unusable cannot spoil the next check; a child
that dies is reported as such and the rest goes on. The whole run stops at --budget-s seconds (default 570, inside
one 10-minute command): a check that would start too close to the end, or is still running then, is reported as
not run; rerun it alone with --parts/--ops/--methods.

--dry-run runs the same processes and tables on the CPU without a GPU: part a runs each op eagerly twice at small
sizes (no capture), parts b and c train with compile=False (no graphs). It checks this script, not the GPU.

Exit status: 0 every required check passed; 1 a required check failed; 4 nothing failed but some checks did not
run (time budget); 2 bad arguments.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import torch

from compiled_soap import CompiledSOAP
from compiled_soap import orthogonalization as orth

from .bench_report import REPO, environment

OPS = ("qr", "cholesky_ex", "solve_triangular", "soap_cholesky")
OP_LABELS = {"qr": "torch.linalg.qr", "cholesky_ex": "torch.linalg.cholesky_ex",
             "solve_triangular": "torch.linalg.solve_triangular", "soap_cholesky": "orthogonalization.cholesky"}
METHODS = tuple(orth.ORTHOGONALIZATIONS)
SIZES = (64, 256, 257, 512, 1024)
BATCHES = (1, 8, 64)
MATCH_TOL = 1e-3  # parts b and c: max |difference| of parameters and losses against the reference run
CONTEXT_BROKEN = 3  # a part-a child's exit status: it recorded a failed capture, then found CUDA unusable
INCOMPLETE = 4
MIN_SECONDS = {"a": 20.0, "b": 60.0, "c": 60.0}  # a check does not start with less of the budget left


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------- part a: raw ops


def op_inputs(op: str, d: int, batch: int, dtype: torch.dtype, device, seed: int) -> tuple:
    """The op's inputs for a [batch, d, d] stack, drawn in float64 on the CPU (same values on every device)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d, d, generator=gen, dtype=torch.float64)
    if op in ("qr", "soap_cholesky"):
        out = (x,)
    else:
        spd = x @ x.mT / d + torch.eye(d, dtype=torch.float64)  # eigenvalues in about [1, 5]
        if op == "cholesky_ex":
            if batch > 1:
                spd[-1] -= 10 * torch.eye(d, dtype=torch.float64)  # indefinite: info > 0, no host check
            out = (spd,)
        else:
            r = torch.linalg.cholesky(spd, upper=True)
            out = (r, torch.randn(batch, d, d, generator=gen, dtype=torch.float64))
    return tuple(t.to(device=device, dtype=dtype) for t in out)


def _solve_right_upper(r, b):
    return torch.linalg.solve_triangular(r, b, upper=True, left=False)


OP_FUNCTIONS = {
    "qr": torch.linalg.qr,
    "cholesky_ex": functools.partial(torch.linalg.cholesky_ex, upper=True),
    "solve_triangular": _solve_right_upper,
    "soap_cholesky": orth.cholesky,
}


def as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def compare_outputs(op: str, got: tuple, want: tuple) -> tuple[bool, float, bool]:
    """(bitwise equal, max |difference|, within tolerance). For cholesky_ex only the matrices whose factorisation
    succeeded are compared (a failed pivot leaves unspecified values behind), and info must agree exactly."""
    got, want = list(got), list(want)
    if op == "cholesky_ex":
        (l_got, info_got), (l_want, info_want) = got, want
        if not torch.equal(info_got, info_want):
            return False, math.inf, False
        ok = info_want == 0
        got, want = [l_got[ok]], [l_want[ok]]
    bitwise = all(torch.equal(g, w) for g, w in zip(got, want))
    diff, scale = 0.0, 1.0
    for g, w in zip(got, want):
        if w.numel() and w.is_floating_point():
            diff = max(diff, (g.double() - w.double()).abs().max().item())
            scale = max(scale, w.double().abs().max().item())
    return bitwise, diff, bitwise or diff <= 1e-4 * scale


def _finite(tensors) -> bool:
    return all(torch.isfinite(t).all().item() for t in tensors if t.is_floating_point())


def _median_ms(fn, device, reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def case_row(op: str, d: int, batch: int, required: bool, **fields) -> dict:
    row = {"part": "a", "op": op, "d": d, "batch": batch, "required": required, "capture": None, "replay": None,
           "bitwise": None, "max_diff": None, "eager_ms": None, "replay_ms": None, "error": None, "result": None}
    row.update(fields)
    return row


def capture_case(op: str, d: int, batch: int, dtype: torch.dtype, device, required: bool) -> dict:
    """Capture op on a [batch, d, d] stack, replay it on new data, compare with eager."""
    fn = OP_FUNCTIONS[op]
    row = case_row(op, d, batch, required)
    static = [t.clone() for t in op_inputs(op, d, batch, dtype, device, seed=0)]
    fresh = op_inputs(op, d, batch, dtype, device, seed=1)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # handles, workspaces, lazy initialisation: before the capture, as Inductor does
        for _ in range(2):
            fn(*static)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    try:
        # thread_local: the capture error mode of Inductor's cudagraph trees
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = as_tuple(fn(*static))
    except Exception as e:  # noqa: BLE001 - the failure is the finding
        row.update(capture="raised", error=_one_line(e), result="FAIL" if required else "capture fails")
        return row
    row["capture"] = "ok"
    try:
        for s, f in zip(static, fresh):
            s.copy_(f)
        graph.replay()
        torch.cuda.synchronize(device)
        got = tuple(t.clone() for t in out)
        want = as_tuple(fn(*fresh))
        torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001
        row.update(replay="raised", error=_one_line(e), result="FAIL" if required else "replay fails")
        return row
    bitwise, diff, close = compare_outputs(op, got, want)
    finite = _finite(got) if op != "cholesky_ex" else True
    row.update(replay="bitwise" if bitwise else ("close" if close else "MISMATCH"), bitwise=bitwise, max_diff=diff)
    row["eager_ms"] = _median_ms(lambda: fn(*fresh), device)
    row["replay_ms"] = _median_ms(graph.replay, device)
    if not close or not finite:
        row["error"] = "replay differs from eager" if not close else "non-finite output"
        row["result"] = "FAIL" if required else "replay differs"
    else:
        row["result"] = "ok"
    del graph, out
    return row


def eager_case(op: str, d: int, batch: int, dtype: torch.dtype, device, required: bool = True) -> dict:
    """The CPU stand-in for capture_case (dry run): the op on its inputs, twice, compared with itself."""
    fn = OP_FUNCTIONS[op]
    inputs = op_inputs(op, d, batch, dtype, device, seed=1)
    bitwise, diff, close = compare_outputs(op, as_tuple(fn(*inputs)), as_tuple(fn(*inputs)))
    ok = close and (op == "cholesky_ex" or _finite(as_tuple(fn(*inputs))))
    return case_row(op, d, batch, required, capture="n/a (cpu)", replay="eager twice", bitwise=bitwise,
                    max_diff=diff, result="ok" if ok else ("FAIL" if required else "fails"))


def cuda_healthy(device) -> bool:
    try:
        torch.cuda.synchronize(device)
        return (torch.ones(4, device=device) * 2).sum().item() == 8.0
    except Exception:  # noqa: BLE001
        return False


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:300] if text else type(e).__name__


# ------------------------------------------------------------------------------------- parts b, c: the optimizer


class SmallNet(torch.nn.Module):
    """A residual MLP classifier: Kronecker factors of sizes 16, 64 and 256, plus 1-D parameters (plain Adam)."""

    def __init__(self, d_in: int = 64, width: int = 256, classes: int = 16):
        super().__init__()
        self.embed = torch.nn.Linear(d_in, width)
        self.norm = torch.nn.LayerNorm(width)
        self.hidden = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, classes)

    def forward(self, x, y):
        h = self.norm(torch.nn.functional.gelu(self.embed(x)))
        h = h + torch.nn.functional.gelu(self.hidden(h))
        return torch.nn.functional.cross_entropy(self.head(h), y)


def make_model(device, seed: int = 0) -> SmallNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallNet()
    return model.to(device)


def make_batches(steps: int, device, seed: int = 1, batch: int = 32) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 64, generator=gen).to(device), torch.randint(0, 16, (batch,), generator=gen).to(device))
            for _ in range(steps)]


class TreeCalls:
    """Counts what Inductor's cudagraph tree manager does with each call of a cudagraphed function: warm up (run it
    eagerly before recording), record, replay, or fall back to eager (the remainder). Wraps the class's methods
    while active; the manager binds `run` when a function is compiled, so enter before compiling."""

    _WRAPPED = (("run_eager", "warmups"), ("record_function", "recordings"), ("execute_node", "replays"))

    def __init__(self):
        self.counts = {"calls": 0, "warmups": 0, "recordings": 0, "replays": 0}
        self.available = False
        self._saved: dict = {}
        self._local = threading.local()

    def __enter__(self):
        try:
            from torch._inductor import cudagraph_trees

            cls = cudagraph_trees.CUDAGraphTreeManager
        except Exception:  # noqa: BLE001 - older/newer torch: the Inductor counters are still reported
            return self
        names = [name for name, _ in self._WRAPPED] + ["run"]
        if not all(callable(getattr(cls, name, None)) for name in names):
            return self
        self._cls = cls
        for name, key in self._WRAPPED:
            self._wrap(name, key, top_level_only=False)
        self._wrap("run", "calls", top_level_only=True)  # run() calls itself once on a new root: count it once
        self.available = True
        return self

    def _wrap(self, name: str, key: str, top_level_only: bool) -> None:
        original = getattr(self._cls, name)
        self._saved[name] = original
        counts, local = self.counts, self._local

        @functools.wraps(original)
        def wrapper(manager, *args, **kwargs):
            level = getattr(local, "level", 0)
            if not top_level_only or level == 0:
                counts[key] += 1
            if top_level_only:
                local.level = level + 1
            try:
                return original(manager, *args, **kwargs)
            finally:
                if top_level_only:
                    local.level = level

        setattr(self._cls, name, wrapper)

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(self._cls, name, original)
        self._saved.clear()

    def snapshot(self) -> dict:
        if not self.available:
            return {}
        c = self.counts
        out = {f"tree_{k}": v for k, v in c.items()}
        out["tree_eager_fallbacks"] = c["calls"] - c["warmups"] - c["recordings"] - c["replays"]
        return out


def graph_counters(tree: TreeCalls | None, device) -> dict:
    """Inductor's cudagraph counters, the tree calls counted so far, and the tree manager's unexpected re-records."""
    from torch._dynamo.utils import counters

    snap = {k: int(v) for k, v in counters["inductor"].items() if "cudagraph" in k}
    snap.setdefault("cudagraph_skips", 0)
    if tree is not None:
        snap.update(tree.snapshot())
    if device.type == "cuda":
        try:
            from torch._inductor import cudagraph_trees

            manager = cudagraph_trees.get_manager(device.index, create_if_none_exists=False)
            if manager is not None:
                snap["tree_unexpected_rerecords"] = sum(sum(v.values()) for v in manager.num_rerecord.values())
        except Exception:  # noqa: BLE001 - private API: report what can be read
            pass
    return snap


def counter_delta(after: dict, before: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before))}


def train(method: str, device, steps: int, period: int, *, compile_opt: bool, compile_model: bool,
          warmup_steps: int, tree: TreeCalls | None = None, label: str = "") -> dict:
    """forward + backward + opt.step() for `steps` steps on fixed batches; counters at start, after warm-up, end."""
    model = make_model(device)
    forward = torch.compile(model, mode="reduce-overhead") if compile_model else model
    opt = CompiledSOAP(model.parameters(), precondition_frequency=period, orthogonalization=method,
                       compile=compile_opt, mode="reduce-overhead")
    batches = make_batches(steps, device)
    mark_step = compile_model and hasattr(torch.compiler, "cudagraph_mark_step_begin")
    snaps = {"start": graph_counters(tree, device)}
    log(f"{label} counters at the start: {json.dumps(snaps['start'])}")
    losses, kinds = [], []
    for t, (x, y) in enumerate(batches, start=1):
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        loss = forward(x, y)
        losses.append(loss.detach().clone())  # a cudagraph output: copied before anything may overwrite it
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        kinds.append(opt.last_step_kind)
        if t == warmup_steps:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            snaps["warm"] = graph_counters(tree, device)
            log(f"{label} counters before the measured steps (after step {t}): {json.dumps(snaps['warm'])}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    snaps["end"] = graph_counters(tree, device)
    snaps.setdefault("warm", snaps["end"])
    log(f"{label} counters after the measured steps (step {steps}): {json.dumps(snaps['end'])}")
    return {"losses": [float(v) for v in losses], "params": [p.detach().cpu() for p in model.parameters()],
            "kinds": kinds, "counters": snaps, "compile_s": float(opt.compile_seconds)}


def max_difference(a: dict, b: dict) -> tuple[float, float]:
    dp = max((x.double() - y.double()).abs().max().item() for x, y in zip(a["params"], b["params"]))
    dl = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
    return dp, dl


def run_row(part: str, method: str, should_pass: bool, **fields) -> dict:
    row = {"part": part, "method": method, "required": should_pass, "error": None, "warmup": {}, "steady": {},
           "steady_steps": 0, "steady_kinds": {}, "finite": None, "max_param_diff": None, "max_loss_diff": None,
           "compile_s": None, "result": None, "reasons": []}
    row.update(fields)
    return row


def optimizer_check(part: str, method: str, args, device, should_pass: bool, tree: TreeCalls | None) -> dict:
    """Part b (eager model, compiled optimizer, against compile=False) or part c (compiled model, against the
    uncompiled model), one method."""
    import torch._inductor.config as inductor_config

    steps = args.steps_b if part == "b" else args.steps_c
    warm = 2 * args.period + 1
    row = run_row(part, method, should_pass, steady_steps=steps - warm)
    label = f"[{part}/{method}]"
    on_gpu = device.type == "cuda"
    with inductor_config.patch({"triton.cudagraph_or_error": True}):
        try:
            main = train(method, device, steps, args.period, compile_opt=on_gpu,
                         compile_model=part == "c" and on_gpu, warmup_steps=warm, tree=tree, label=label)
        except Exception as e:  # noqa: BLE001 - the failure is the finding
            traceback.print_exc()
            row["error"] = _one_line(e)
            return judge(row, expect_graphs=on_gpu)
        log(f"{label} reference run ({'compile=False' if part == 'b' else 'uncompiled model'})")
        try:
            ref = train(method, device, steps, args.period, compile_opt=part == "c" and on_gpu,
                        compile_model=False, warmup_steps=warm, tree=None, label=f"{label}[reference]")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            ref, row["error"] = None, "reference run: " + _one_line(e)
    c = main["counters"]
    row["warmup"] = counter_delta(c["warm"], c["start"])
    row["steady"] = counter_delta(c["end"], c["warm"])
    kinds = main["kinds"][warm:]
    row["steady_kinds"] = {k: kinds.count(k) for k in sorted(set(kinds))}
    row["finite"] = all(math.isfinite(v) for v in main["losses"]) and _finite(main["params"])
    if ref is not None:
        row["max_param_diff"], row["max_loss_diff"] = max_difference(main, ref)
    row["compile_s"] = main["compile_s"]
    return judge(row, expect_graphs=on_gpu)


def judge(row: dict, expect_graphs: bool) -> dict:
    """Fill row["reasons"] and row["result"] from the measured fields."""
    reasons = []
    if row["error"]:
        reasons.append(row["error"])
    if row["finite"] is not None:  # the measured run completed
        steady, n = row["steady"], max(1, row["steady_steps"])
        if row["warmup"].get("cudagraph_skips", 0) + steady.get("cudagraph_skips", 0) > 0:
            reasons.append(f"cudagraph skips: {row['warmup'].get('cudagraph_skips', 0)} in warm-up, "
                           f"{steady.get('cudagraph_skips', 0)} in steady state")
        for key, what in (("tree_recordings", "recordings"), ("tree_warmups", "warm-up runs"),
                          ("tree_eager_fallbacks", "eager fallbacks"), ("tree_unexpected_rerecords", "re-records")):
            if steady.get(key, 0) > 0:
                reasons.append(f"{steady[key]} {what} in the {row['steady_steps']} steady-state steps")
        if expect_graphs and "tree_replays" in steady and steady["tree_replays"] < n:
            reasons.append(f"{steady['tree_replays']} graph replays in {n} steady-state steps (expected >= 1 each)")
        if expect_graphs and not {"plain", "refresh"} <= set(row["steady_kinds"]):
            reasons.append(f"steady state did not cover both step kinds: {row['steady_kinds']}")
        if not row["finite"]:
            reasons.append("non-finite loss or parameters")
        for key in ("max_param_diff", "max_loss_diff"):
            if row[key] is not None and not row[key] <= MATCH_TOL:
                reasons.append(f"{key} {row[key]:.3g} > {MATCH_TOL:g} against the reference run")
    row["reasons"] = reasons
    row["result"] = "pass" if not reasons else ("FAIL" if row["required"] else "fails (not required)")
    return row


# ------------------------------------------------------------------------------------------------ orchestration


def part_a_cases(args) -> list[tuple[int, int]]:
    return [(d, b) for d in args.sizes for b in args.batches]


def device_of(args) -> torch.device:
    return torch.device("cpu") if args.dry_run else torch.device("cuda", torch.cuda.current_device())


def child_main(args) -> int:
    """One op of part a (cases from --start on, one JSON line each) or one (part, method) of b/c (one JSON)."""
    part, name = args.child.split(":", 1)
    device = device_of(args)
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.backends.cuda.preferred_linalg_library(args.linalg_library)
    dtype = getattr(torch, args.dtype)
    if part == "a":
        required = name != "qr" or args.strict_qr
        for d, batch in part_a_cases(args)[args.start:]:
            if args.deadline and time.time() > args.deadline:
                row = case_row(name, d, batch, required, result="not run", error="time budget")
            else:
                try:
                    case = capture_case if on_gpu else eager_case
                    row = case(name, d, batch, dtype, device, required)
                except Exception as e:  # noqa: BLE001 - e.g. out of memory while preparing: recorded, go on
                    row = case_row(name, d, batch, required, result="FAIL" if required else "error",
                                   error=_one_line(e))
            log(format_a_rows([row], header=False))
            with open(args.result, "a") as f:
                f.write(json.dumps(row) + "\n")
            if on_gpu:
                torch.cuda.empty_cache()
            if on_gpu and row["error"] and row["result"] != "not run" and not cuda_healthy(device):
                log(f"[a/{name}] CUDA is unusable after this failure: continuing in a fresh process")
                return CONTEXT_BROKEN
        return 0
    with TreeCalls() as tree:
        row = optimizer_check(part, name, args, device, should_pass=args.required == "yes", tree=tree)
    with open(args.result, "w") as f:
        json.dump(row, f)
    return 0


def spawn(args, spec: str, result: str, extra: list[str]) -> int | str:
    """Run one child; its output goes to ours. Returns its exit status, or "timeout"."""
    cmd = [sys.executable, "-m", "profiling.cuda_capture_check", "--child", spec, "--result", result,
           "--dtype", args.dtype, "--linalg-library", args.linalg_library, "--period", str(args.period),
           "--steps-b", str(args.steps_b), "--steps-c", str(args.steps_c),
           "--sizes", ",".join(map(str, args.sizes)), "--batches", ",".join(map(str, args.batches)),
           "--deadline", str(args.deadline), *(["--strict-qr"] if args.strict_qr else []),
           *(["--dry-run"] if args.dry_run else []), *extra]
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    sys.stdout.flush()
    try:
        return subprocess.run(cmd, cwd=REPO, env=env, timeout=max(1.0, args.deadline - time.time())).returncode
    except subprocess.TimeoutExpired:
        return "timeout"


def run_part_a(args, tmp: str) -> list[dict]:
    rows = []
    cases = part_a_cases(args)
    log("\n== part a: capture of single ops ==\n" + format_a_rows([], header=True))
    for op in args.ops:
        required = op != "qr" or args.strict_qr
        start = 0
        while start < len(cases):
            if args.deadline - time.time() < MIN_SECONDS["a"]:
                rows += [case_row(op, d, b, required, result="not run", error="time budget") for d, b in cases[start:]]
                break
            path = os.path.join(tmp, f"a-{op}-{start}.jsonl")
            status = spawn(args, f"a:{op}", path, ["--start", str(start)])
            done = []
            if os.path.exists(path):
                with open(path) as f:
                    done = [json.loads(line) for line in f if line.strip()]
            rows += done
            start += len(done)
            if start >= len(cases):
                break
            if status == "timeout":  # the budget ran out inside this case
                rows += [case_row(op, d, b, required, result="not run", error="time budget") for d, b in cases[start:]]
                break
            if status != CONTEXT_BROKEN or not done:  # ended inside a case (crash, or 0 too early): its culprit
                d, b = cases[start]
                rows.append(case_row(op, d, b, required, result="FAIL" if required else "crashed",
                                     error=f"process ended ({status}) during this case"))
                log(format_a_rows([rows[-1]], header=False))
                start += 1
    return rows


def run_parts_bc(args, tmp: str, parts: list[str], qr_ok: bool | None) -> list[dict]:
    rows = []
    for part in parts:
        log(f"\n== part {part}: CompiledSOAP{' next to a compiled model' if part == 'c' else ''} ==")
        for method in args.methods:
            required = args.strict_qr or method != "householder" or qr_ok is not False
            if args.deadline - time.time() < MIN_SECONDS[part]:
                rows.append(run_row(part, method, required, result="not run", reasons=["time budget"]))
                continue
            path = os.path.join(tmp, f"{part}-{method}.json")
            log(f"\n[{part}/{method}] starting")
            status = spawn(args, f"{part}:{method}", path, ["--required", "yes" if required else "no"])
            if os.path.exists(path):
                with open(path) as f:
                    rows.append(json.load(f))
                if status != 0:
                    rows[-1]["reasons"].append(f"(the process then ended with status {status})")
            elif status == "timeout":
                rows.append(run_row(part, method, required, result="not run",
                                    reasons=["time budget ran out during this check"]))
            else:
                row = run_row(part, method, required, error=f"process ended ({status}) without a result")
                rows.append(judge(row, expect_graphs=not args.dry_run))
            log(format_bc_rows(rows[-1:]))
    return rows


def _cell(x, spec="{}") -> str:
    return "-" if x is None else spec.format(x)


def _table(head: list[str], body: list[list[str]], header: bool = True, widths=None) -> str:
    """Left-aligned columns; fixed `widths` (part a) keep rows printed one at a time under one header."""
    widths = widths or [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(head)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in body]
    if header:
        top = "  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()
        lines = [top, "-" * len(top)] + lines
    return "\n".join(lines)


A_HEAD = ["op", "d", "B", "capture", "replay", "max|diff|", "eager ms", "replay ms", "required", "result"]
A_WIDTHS = [29, 5, 3, 9, 11, 9, 9, 9, 8, 6]


def format_a_rows(rows: list[dict], header: bool = True) -> str:
    body = [[OP_LABELS.get(r["op"], r["op"]), str(r["d"]), str(r["batch"]), _cell(r["capture"]), _cell(r["replay"]),
             _cell(r["max_diff"], "{:.2e}"), _cell(r["eager_ms"], "{:.3f}"), _cell(r["replay_ms"], "{:.3f}"),
             "yes" if r["required"] else "probe",
             r["result"] + (f"  {r['error']}" if r.get("error") and r["result"] != "ok" else "")] for r in rows]
    return _table(A_HEAD, body, header, A_WIDTHS)


def format_bc_rows(rows: list[dict]) -> str:
    head = ["part", "method", "result", "skips warm/steady", "recorded warm/steady", "re-records", "replays/step",
            "fallbacks", "max|dparam|", "max|dloss|", "finite", "compile s", "why"]
    body = []
    for r in rows:
        w, s, n = r["warmup"], r["steady"], max(1, r["steady_steps"])
        body.append([
            r["part"], r["method"], r["result"],
            f"{_cell(w.get('cudagraph_skips'))}/{_cell(s.get('cudagraph_skips'))}",
            f"{_cell(w.get('tree_recordings'))}/{_cell(s.get('tree_recordings'))}",
            _cell(s.get("tree_unexpected_rerecords")),
            _cell(None if "tree_replays" not in s else s["tree_replays"] / n, "{:.2f}"),
            _cell(s.get("tree_eager_fallbacks")), _cell(r["max_param_diff"], "{:.2e}"),
            _cell(r["max_loss_diff"], "{:.2e}"), _cell(r["finite"]), _cell(r["compile_s"], "{:.1f}"),
            "; ".join(r["reasons"])])
    return _table(head, body)


def exit_status(rows: list[dict]) -> int:
    if any(r["required"] and r["result"] == "FAIL" for r in rows):
        return 1
    if any(r["result"] == "not run" for r in rows):
        return INCOMPLETE
    return 0


def print_header(args, device) -> dict:
    env = environment(device)
    env["preferred_linalg_library"] = args.linalg_library
    env["dtype"] = args.dtype
    for key in ("date", "command", "commit", "dirty", "gpu_name", "driver", "torch", "cuda", "python",
                "preferred_linalg_library", "dtype"):
        log(f"{key:25s} {env.get(key)}")
    return env


def write_outputs(args, env: dict, rows: list[dict]) -> None:
    if args.outdir:
        os.makedirs(args.outdir, exist_ok=True)
        path = os.path.join(args.outdir, "capture.json")
        with open(path, "w") as f:
            json.dump({"env": env, "config": {k: v for k, v in vars(args).items() if k not in ("child", "result")},
                       "rows": rows}, f, indent=1, default=str)
        log(f"\nwrote {path}")


def _int_list(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _choice_list(choices):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(choices)}")
        return items

    return parse


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m profiling.cuda_capture_check", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=_choice_list(("a", "b", "c")), default=["a", "b", "c"], help="default a,b,c")
    ap.add_argument("--outdir", help="also write capture.json (environment, configuration, every row) here")
    ap.add_argument("--ops", type=_choice_list(OPS), default=list(OPS), help="part a ops: " + ",".join(OPS))
    ap.add_argument("--sizes", type=_int_list, help=f"part a matrix sizes d (default {','.join(map(str, SIZES))}; "
                                                     "8,9 with --dry-run)")
    ap.add_argument("--batches", type=_int_list, help=f"part a batch sizes B (default {','.join(map(str, BATCHES))}; "
                                                       "1,2 with --dry-run)")
    ap.add_argument("--methods", type=_choice_list(METHODS), default=list(METHODS),
                    help="parts b, c orthogonalization methods: " + ",".join(METHODS))
    ap.add_argument("--steps-b", type=int, default=30, help="optimizer steps in part b")
    ap.add_argument("--steps-c", type=int, default=20, help="training steps in part c")
    ap.add_argument("--period", type=int, default=4, help="precondition_frequency in parts b and c")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="part a dtype")
    ap.add_argument("--linalg-library", choices=["default", "cusolver", "magma"], default="default",
                    help="torch.backends.cuda.preferred_linalg_library for every part")
    ap.add_argument("--strict-qr", action="store_true", help="QR capture is required, not a probe")
    ap.add_argument("--budget-s", type=float, default=570.0,
                    help="wall-clock limit of the whole run (default 570: inside one 10-minute command)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU: the same processes and tables with eager ops and compile=False (checks the script)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--required", choices=["yes", "no"], default="yes", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.sizes is None:
        args.sizes = [8, 9] if args.dry_run else list(SIZES)
    if args.batches is None:
        args.batches = [1, 2] if args.dry_run else list(BATCHES)
    if args.period < 2 or min(args.steps_b, args.steps_c) < 3 * args.period + 1:
        ap.error("need --period >= 2 and --steps-b, --steps-c >= 3 * period + 1 (warm-up: 2f+1 steps; the steady "
                 "state after it must hold a refresh, at step 3f+1)")
    if any(d < 1 for d in args.sizes) or any(b < 1 for b in args.batches):
        ap.error("--sizes and --batches must be positive")
    if not (args.dry_run or args.child) and not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (torch.cuda.is_available() is False); --dry-run checks the script on the CPU")
    if not args.deadline:
        args.deadline = time.time() + args.budget_s
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    device = device_of(args)
    env = print_header(args, device)
    if args.dry_run:
        log("dry run on the CPU: no capture, no compilation; this checks the script, not a GPU")
    rows: list[dict] = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="capture-check-") as tmp:
        if "a" in args.parts:
            rows += run_part_a(args, tmp)
        qr = [r for r in rows if r["part"] == "a" and r["op"] == "qr" and r["result"] != "not run"]
        qr_ok = None if not qr else all(r["result"] == "ok" for r in qr)
        rows += run_parts_bc(args, tmp, [p for p in ("b", "c") if p in args.parts], qr_ok)
    a_rows = [r for r in rows if r["part"] == "a"]
    bc_rows = [r for r in rows if r["part"] != "a"]
    log(f"\n== summary ({time.time() - started:.0f} s) ==")
    if a_rows:
        log("\n" + format_a_rows(a_rows))
    if bc_rows:
        log("\n" + format_bc_rows(bc_rows))
    if qr_ok is False:
        log("\nQR did not capture at every size: the 'householder' rows are not required "
            "(orthogonalization='householder-outside-graph' or 'cholesky' is the way on this GPU).")
    write_outputs(args, env, rows)
    status = exit_status(rows)
    failed = [r for r in rows if r["required"] and r["result"] == "FAIL"]
    log(f"\n{len(failed)} required check(s) failed" + ("; some checks did not run (time budget): rerun them with "
                                                      "--parts/--ops/--methods" if status == INCOMPLETE else ""))
    return status


if __name__ == "__main__":
    sys.exit(main())
