"""CPU checks of the profiling kit: bench.py end to end on the tiny preset, summarize.py on synthetic traces.
(The CUDA capture checks are tests: tests/test_cuda_capture.py.)

The bench smoke runs all four optimizers on the tiny preset; compiled-soap with the aot_eager backend (Inductor's
C++ compilation takes minutes on a 2-core CPU; aot_eager traces the same graphs in ~20 s). The profiling kit is a
package run as `python -m profiling.<module>` from the repository root, which is where these tests run it.
"""

import json
import math
import os
import sqlite3
import subprocess
import sys

import pytest

from profiling import flop_model as flops
from profiling import summarize
from profiling.presets import PRESETS
from tests.spawning import SUBPROCESS_TIMEOUT_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CUDA_FIELDS = ["launches_per_step", "graph_replays_per_step", "kernels_per_step", "gpu_busy_fraction", "peak_bytes"]


def run_bench(tmp_path, optimizers, *extra):
    out = tmp_path / "tiny.json"
    trace = tmp_path / "trace.json"
    cmd = [sys.executable, "-m", "profiling.bench", "--preset", "tiny", "--device", "cpu",
           "--json", str(out), "--steps", "2", "--repeats", "2", "--refresh-period", "2", "--threads", "1",
           "--optimizers", ",".join(optimizers), "--torch-profile", str(trace), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), out, trace, proc.stdout


def check_rows(data, optimizers):
    env = data["env"]
    for key in ["device", "gpu_name", "driver", "torch", "cuda", "python", "commit", "command", "date"]:
        assert key in env
    assert env["device"] == "cpu" and env["gpu_name"] is None and env["torch"] and env["python"]
    assert env["command"].startswith("python -m profiling.bench --preset tiny") and env["date"]
    assert env["matmul_tflops_ceiling"] > 0
    rows = {r["optimizer"]: r for r in data["rows"]}
    assert list(rows) == optimizers
    for name, r in rows.items():
        if not r["available"]:
            assert r["skipped"], name
            continue
        assert r["error"] is None, r["error"]
        assert math.isfinite(r["plain_step_ms"]) and r["plain_step_ms"] > 0, name
        assert r["plain_step_ms_p10"] <= r["plain_step_ms"] <= r["plain_step_ms_p90"]
        assert r["state_bytes"] > 0 and r["timer"] == "perf_counter"
        for key in CUDA_FIELDS:
            assert r[key] is None, (name, key)
        if name == "adamw":
            assert r["refresh_step_ms"] is None and r["tflops"] is None
        else:
            assert r["refresh_step_ms"] > 0 and r["refresh_samples"] == 2 and r["plain_samples"] == 2
            assert r["amortized_step_ms"] > 0 and r["tflops"] > 0 and r["kind_mismatches"] == 0
    return rows


def test_bench_tiny_cpu(tmp_path):
    optimizers = ["adamw", "soap-reference", "soap-batched-eager"]
    data, out, trace, stdout = run_bench(tmp_path, optimizers)
    check_rows(data, optimizers)
    assert out.with_suffix(".png").stat().st_size > 0
    assert "speedup" in stdout
    # The --torch-profile window: one annotated range per step and kind, no CUDA columns on CPU.
    rows = {r["range"]: r for r in summarize.summarize(summarize.read_torch_trace(str(trace)))}
    assert rows["adamw/step/plain"]["count"] == 2
    assert rows["soap-reference/step/plain"]["count"] + rows["soap-reference/step/refresh"]["count"] == 2
    assert rows["adamw/step/plain"]["launches_per"] is None


@pytest.mark.compile
def test_bench_tiny_cpu_compiled(tmp_path):
    data, *_ = run_bench(tmp_path, ["compiled-soap"], "--backend", "aot_eager", "--warmup-cycles", "2")
    rows = check_rows(data, ["compiled-soap"])
    assert rows["compiled-soap"]["available"]


def test_missing_compiled_soap_is_skipped(monkeypatch):
    import compiled_soap
    import torch
    from profiling.bench_runner import Unavailable, build_optimizer

    monkeypatch.delattr(compiled_soap, "CompiledSOAP", raising=False)
    with pytest.raises(Unavailable):
        build_optimizer("compiled-soap", [torch.nn.Parameter(torch.zeros(2, 2))], torch.device("cpu"), 4)


def test_bench_hyperparameters_and_orthogonalization(monkeypatch):
    """bench's optimizers take SOAP's defaults from the library, and --orthogonalization reaches both SOAPs."""
    import compiled_soap
    import torch
    from compiled_soap.hyperparameters import DEFAULTS
    from compiled_soap.orthogonalization import ORTHOGONALIZATIONS

    from profiling import bench, bench_runner

    assert bench_runner.HYPER == {k: DEFAULTS[k] for k in ("lr", "betas", "eps", "weight_decay")}
    assert bench_runner.ORTHOGONALIZATIONS == tuple(ORTHOGONALIZATIONS)
    made = []

    def fake(kind):
        def build(params, **kwargs):
            made.append((kind, kwargs))
            return kind
        return build

    monkeypatch.setattr(compiled_soap, "SOAP", fake("SOAP"))
    monkeypatch.setattr(compiled_soap, "CompiledSOAP", fake("CompiledSOAP"))
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    for method in ORTHOGONALIZATIONS:
        made.clear()
        for name in ("soap-reference", "soap-batched-eager", "compiled-soap"):
            bench_runner.build_optimizer(name, params, torch.device("cpu"), 4, "aot_eager", method)
        (_, ref), (_, eager), (_, compiled) = made
        assert ref["orthogonalization"] == ("householder" if method == "householder-outside-graph" else method)
        assert eager["orthogonalization"] == compiled["orthogonalization"] == method
        assert eager["compile"] is False and compiled["compile"] is True and compiled["backend"] == "aot_eager"
        for kwargs in (ref, eager, compiled):
            assert {k: kwargs[k] for k in bench_runner.HYPER} == bench_runner.HYPER
            assert kwargs["precondition_frequency"] == 4
    args = bench.parse_args(["--preset", "tiny", "--device", "cpu", "--orthogonalization", "cholesky"])
    assert args.orthogonalization == "cholesky" and args.json.endswith("bench-tiny-cpu-cholesky.json")
    assert bench.parse_args(["--preset", "tiny", "--device", "cpu"]).orthogonalization == "householder"
    with pytest.raises(SystemExit):
        bench.parse_args(["--preset", "tiny", "--device", "cpu", "--orthogonalization", "gram-schmidt"])


@pytest.mark.parametrize("module", ["bench_host", "bench_orthogonalization", "compile_scaling", "per_kind_host_cost",
                                    "per_kind_steady", "summarize"])
def test_modules_run_as_package(module, capsys):
    """Every script is a module of the profiling package (`python -m profiling.<name>`), no sys.path edits."""
    import importlib

    mod = importlib.import_module(f"profiling.{module}")
    with pytest.raises(SystemExit) as exit_info:
        mod.main(["--help"])
    assert exit_info.value.code == 0
    assert f"python -m profiling.{module}" in capsys.readouterr().out


def test_presets_and_flop_model():
    gpt2 = PRESETS["gpt2-small"]
    assert gpt2.numel() == 124_439_808
    shapes = [s for _, s in gpt2.shapes()]
    # 12 blocks x 4 matrices x 2 factors, wpe 2, wte 1 (its 50257 axis is over max_precond_dim).
    assert flops.n_factors(shapes) == 99
    assert flops.factor_sizes((50257, 768)) == [None, 768]
    assert flops.unit_flops((3072, 768)) == 2 * (3072**2 * 768 + 3072 * 768**2)
    plain_ref = flops.step_flops(shapes, "reference", "plain")
    assert plain_ref == pytest.approx(5 / 3 * flops.step_flops(shapes, "batched", "plain"))
    extra = flops.step_flops(shapes, "batched", "refresh") - plain_ref  # refresh = 5 units + M·Q + QR
    assert extra == pytest.approx(sum(flops.refresh_extra_flops(s) for s in shapes))
    assert flops.step_flops(shapes, None, "plain") is None
    assert flops.amortized(1.0, 11.0, 10) == pytest.approx(2.0)


# ------------------------------------------------------------------ summarize.py


def make_nsys_db(path, with_gpu_tables=True):
    """A miniature nsys export: 2 CompiledSOAP steps (one graph replay of 3 kernels + 1 memcpy + 1 kernel launch
    each) inside NVTX ranges, plus a launch outside any range."""
    pid, tid = 4242, 7
    gtid, gpid = (pid << 24) | tid, pid << 24
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE StringIds (id INTEGER PRIMARY KEY, value TEXT)")
    names = {1: "cudaGraphLaunch_v10000", 2: "cudaMemcpyAsync_v3020", 3: "cudaLaunchKernel_v7000",
             4: "graph/plain", 5: "cuLaunchKernel"}
    con.executemany("INSERT INTO StringIds VALUES (?, ?)", names.items())
    con.execute("CREATE TABLE NVTX_EVENTS (start INT, end INT, eventType INT, text TEXT, textId INT, "
                "globalTid INT, domainId INT)")
    nvtx = [(0, None, 75, "compiled_soap", None, gtid, 1)]  # domain creation
    for k in range(2):
        t = 1000 * k
        nvtx += [(t, t + 500, 59, "step", None, gtid, 1), (t + 100, t + 400, 59, None, 4, gtid, 1)]
    nvtx.append((5000, None, 59, "unclosed", None, gtid, 1))
    con.executemany("INSERT INTO NVTX_EVENTS VALUES (?, ?, ?, ?, ?, ?, ?)", nvtx)
    if with_gpu_tables:
        con.execute("CREATE TABLE CUPTI_ACTIVITY_KIND_RUNTIME (start INT, end INT, globalTid INT, "
                    "correlationId INT, nameId INT)")
        con.execute("CREATE TABLE CUPTI_ACTIVITY_KIND_KERNEL (start INT, end INT, globalPid INT, "
                    "correlationId INT, demangledName INT)")
        calls, kernels = [], []
        for k in range(2):
            t, c = 1000 * k, 10 * k
            calls += [(t + 50, t + 60, gtid, c + 1, 2), (t + 200, t + 210, gtid, c + 2, 1),
                      (t + 450, t + 460, gtid, c + 3, 3)]
            kernels += [(t + 300 + 10 * i, t + 305 + 10 * i, gpid, c + 2, 0) for i in range(3)]
            kernels.append((t + 600, t + 640, gpid, c + 3, 0))  # runs after the range closed: still counted
        calls.append((3000, 3010, gtid, 99, 5))  # outside every range
        kernels.append((3100, 3200, gpid, 99, 0))
        con.executemany("INSERT INTO CUPTI_ACTIVITY_KIND_RUNTIME VALUES (?, ?, ?, ?, ?)", calls)
        con.executemany("INSERT INTO CUPTI_ACTIVITY_KIND_KERNEL VALUES (?, ?, ?, ?, ?)", kernels)
    con.commit()
    con.close()


def test_summarize_nsys_sqlite(tmp_path, capsys):
    db = str(tmp_path / "mini.sqlite")
    make_nsys_db(db)
    rows = {r["range"]: r for r in summarize.summarize(summarize.read(db))}
    assert set(rows) == {"compiled_soap:step", "compiled_soap:graph/plain"}
    step, graph = rows["compiled_soap:step"], rows["compiled_soap:graph/plain"]
    assert step["count"] == 2 and step["mean_ms"] == pytest.approx(500e-6)
    assert step["graph_launches_per"] == 1 and step["memcpy_per"] == 1 and step["launches_per"] == 1
    assert step["kernels_per"] == 4 and step["kernel_ms_per"] == pytest.approx(55e-6)
    assert graph["graph_launches_per"] == 1 and graph["launches_per"] == 0 and graph["kernels_per"] == 3
    assert summarize.main([db, "--json", str(tmp_path / "s.json")]) == 0
    assert "compiled_soap:graph/plain" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())["rows"]


def test_summarize_nsys_without_gpu_tables(tmp_path):
    db = str(tmp_path / "cpu.sqlite")
    make_nsys_db(db, with_gpu_tables=False)
    tr = summarize.read(db)
    rows = summarize.summarize(tr)
    assert rows and all(r["launches_per"] is None and r["kernels_per"] is None for r in rows)
    assert len(tr.notes) == 2
    empty = str(tmp_path / "empty.sqlite")
    sqlite3.connect(empty).close()
    assert summarize.summarize(summarize.read(empty)) == []


def test_summarize_torch_trace():
    ev = [
        {"ph": "X", "cat": "user_annotation", "name": "compiled-soap/step/plain", "pid": 1, "tid": 1, "ts": 0,
         "dur": 100},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "pid": 1, "tid": 1, "ts": 10, "dur": 5,
         "args": {"correlation": 7}},
        {"ph": "X", "cat": "cuda_driver", "name": "cuLaunchKernelEx", "pid": 1, "tid": 1, "ts": 20, "dur": 5,
         "args": {"correlation": 8}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "pid": 1, "tid": 1, "ts": 30,
         "dur": 5, "args": {"correlation": 9}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": 1, "tid": 2, "ts": 40, "dur": 5,
         "args": {"correlation": 10}},  # other thread: not this range's
        {"ph": "X", "cat": "kernel", "name": "k", "pid": 0, "tid": 7, "ts": 50, "dur": 20, "args": {"correlation": 7}},
        {"ph": "X", "cat": "kernel", "name": "k", "pid": 0, "tid": 7, "ts": 70, "dur": 30, "args": {"correlation": 7}},
        {"ph": "X", "cat": "kernel", "name": "k", "pid": 0, "tid": 7, "ts": 99, "dur": 1, "args": {"correlation": 10}},
    ]
    (row,) = summarize.summarize(summarize.read_torch_trace({"traceEvents": ev}))
    assert row["count"] == 1 and row["mean_ms"] == pytest.approx(0.1)
    assert row["graph_launches_per"] == 1 and row["launches_per"] == 1 and row["syncs_per"] == 1
    assert row["kernels_per"] == 2 and row["kernel_ms_per"] == pytest.approx(0.05)
    assert row["gpu_busy"] == pytest.approx(0.5)
    assert summarize.classify("cudaLaunchKernelExC_v11060") == "launch"
    assert summarize.classify("cudaMemcpyAsync_v3020") == "memcpy"
    assert summarize.classify("cudaEventRecord") is None


def test_compile_scaling_cold_and_warm(tmp_path):
    """Two shape counts, cold then warm cache, each in its own process (aot_eager: seconds, not minutes). Checks the
    numbers: one row per (shapes, cache), the run stepped through its refreshes, and all the compile time spent in
    the first plain call (had the first refresh compiled its graph, about half would fall there). No timing
    assertion: the machine may be loaded."""
    out = tmp_path / "scaling.json"
    cmd = [sys.executable, "-m", "profiling.compile_scaling", "--shapes", "2,4", "--backend", "aot_eager",
           "--timeout", str(SUBPROCESS_TIMEOUT_S), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=2 * SUBPROCESS_TIMEOUT_S, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [(r["shapes"], r["cache"]) for r in rows] == [(2, "cold"), (2, "warm"), (4, "cold"), (4, "warm")]
    for r in rows:
        assert os.path.samefile(r["package"], ROOT)
        assert r["kinds"][0] == "init" and r["kinds"].count("refresh") == 4
        assert len(r["call_s"]) == len(r["kinds"]) and all(s > 0 for s in r["call_s"])
        assert 0 < r["compile_s"] <= sum(r["call_s"])
        assert r["first_plain_call_s"] >= r["compile_s"] * 0.9
    assert "cold compile at 4 shapes / at 2 shapes" in proc.stdout


def test_per_kind_host_cost_runs_and_checks_every_option(capsys):
    """Two buckets, a few calls: each option is built, checked against the eager step inside the script (an
    assert_close per tensor), and timed; one row comes out, with the ratio to today's design. No timing assertion."""
    from profiling import per_kind_host_cost

    per_kind_host_cost.main(["--shapes", "2", "--calls", "6", "--options", "today,standalone"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 1 and rows[0].count("x); setup") == 2, rows


def test_per_kind_steady_times_each_form_of_each_bucket(capsys):
    """Two buckets of the tiny preset (aot_eager: traces, no code generation), one timed call per form: a row per
    bucket with three positive times and their ratio, and the whole step as their sums. No timing assertion."""
    from profiling import per_kind_steady

    per_kind_steady.main(["--preset", "tiny", "--steps", "plain", "--repeats", "1", "--backend", "aot_eager",
                          "--max-buckets", "2"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| (")]
    assert len(rows) == 2
    for cells in rows:
        times = [float(c) for c in cells[2:5]]
        assert all(t > 0 for t in times)
        assert float(cells[5].strip().rstrip("x")) == pytest.approx(times[0] / times[1], rel=0.01)
