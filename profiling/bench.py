"""Benchmark AdamW, the reference SOAP and CompiledSOAP (eager and compiled) on GPT-style parameter lists.

    python -m profiling.bench --preset gpt2-small --device cuda --json runs/gpt2-small.json

One row per optimizer in a JSON file ({"env", "config", "rows"}), a table on stdout (speedups over soap-reference)
and a bar chart next to the JSON. What each field means: profiling/README.md. Only optimizer.step() is timed; the
gradients are synthetic (presets.py), fixed, and assigned before each step.

The run uses a short refresh period (--refresh-period, default 4) so that refresh steps are sampled often; plain and
refresh steps are timed separately and `amortized_step_ms` re-weights them to the library's default period
(compiled_soap.hyperparameters.DEFAULTS["precondition_frequency"]).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

import numpy as np
import torch

from compiled_soap.hyperparameters import DEFAULTS as SOAP_DEFAULTS

from . import bench_report as report
from . import flop_model as flops
from .bench_runner import (COMPILE_UNIT, DEFAULT_OPTIMIZERS, FLOP_VARIANT, OPTIMIZERS, ORTHOGONALIZATIONS, Runner,
                           Unavailable, reference_orthogonalization, sync)
from .presets import PRESETS, make_grads

COMPILED = ("compiled-soap", *COMPILE_UNIT)  # the rows whose first calls compile and record graphs
AMORTIZE_PERIOD = int(SOAP_DEFAULTS["precondition_frequency"])  # the library's default refresh period

ROW_FIELDS = [
    "preset", "optimizer", "available", "skipped", "error", "timer",
    "plain_step_ms", "plain_step_ms_p10", "plain_step_ms_p90", "plain_samples",
    "refresh_step_ms", "refresh_step_ms_p10", "refresh_step_ms_p90", "refresh_samples",
    "amortized_step_ms", "amortize_period", "init_step_ms", "warmup_s", "warmup_calls", "warmup_overhead_s",
    "compile_s", "compile_unit",
    "launches_per_step", "graph_replays_per_step", "kernels_per_step", "memcpy_per_step", "syncs_per_step",
    "launches_per_refresh_step", "graph_replays_per_refresh_step", "kernels_per_refresh_step",
    "gpu_busy_fraction", "state_bytes", "peak_bytes",
    "flops_plain", "flops_refresh", "flops_amortized", "tflops", "tflops_plain", "tflops_refresh",
    "matmul_tflops_ceiling", "kind_mismatches", "notes",
]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def empty_row(preset: str, name: str) -> dict:
    row = dict.fromkeys(ROW_FIELDS)
    row.update(preset=preset, optimizer=name, available=True, notes=[])
    return row


def stats(xs: list[float]):
    if not xs:
        return None, None, None
    a = np.asarray(xs)
    return float(np.median(a)), float(np.percentile(a, 10)), float(np.percentile(a, 90))


def matmul_ceiling(device: torch.device) -> float:
    """Achieved TFLOP/s of one large square fp32 matmul at the run's matmul precision: the roof the SOAP rows are
    compared against (SOAP's matmuls are smaller, so they cannot beat it)."""
    n, reps = (8192, 10) if device.type == "cuda" else (1024, 3)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def measure(r: Runner, shapes: list, args, ceiling: float) -> dict:
    row = empty_row(args.preset, r.name)
    cuda = r.device.type == "cuda"
    row.update(timer="cuda_events" if cuda else "perf_counter", amortize_period=AMORTIZE_PERIOD,
               matmul_tflops_ceiling=ceiling)

    # Warm-up: CompiledSOAP compiles a graph on its first plain / refresh call, records on the second and replays
    # from the third, so three refresh periods; eager optimizers only need their libraries initialised.
    cycles = args.warmup_cycles if args.warmup_cycles is not None else (3 if r.name in COMPILED else 1)
    log(f"{r.name}: warm-up, {1 + cycles * r.period} calls")
    warm = r.warm_up(cycles * r.period)
    row.update(init_step_ms=warm["init_s"] * 1e3, warmup_s=warm["total_s"], warmup_calls=1 + cycles * r.period)

    log(f"{r.name}: timing {args.repeats} x {args.steps} steps")
    if cuda:
        torch.cuda.reset_peak_memory_stats(r.device)
    samples: dict[str, list] = {}
    for _ in range(args.repeats):
        for kind, ms in r.time_steps(args.steps):
            samples.setdefault(kind, []).append(ms)
    if cuda:
        row["peak_bytes"] = torch.cuda.max_memory_allocated(r.device) - r.baseline_bytes
    row["state_bytes"] = r.state_bytes()
    odd = sorted(set(samples) - {"plain", "refresh"})
    if odd:
        row["notes"].append(f"unexpected step kinds during timing: {odd}")

    plain, refresh = stats(samples.get("plain", [])), stats(samples.get("refresh", []))
    row.update(plain_step_ms=plain[0], plain_step_ms_p10=plain[1], plain_step_ms_p90=plain[2],
               plain_samples=len(samples.get("plain", [])), refresh_step_ms=refresh[0],
               refresh_step_ms_p10=refresh[1], refresh_step_ms_p90=refresh[2],
               refresh_samples=len(samples.get("refresh", [])), kind_mismatches=r.kind_mismatches)
    if r.has_refresh and refresh[0] is None:
        row["notes"].append("no refresh step was timed: amortized_step_ms left empty")
    else:
        row["amortized_step_ms"] = flops.amortized(plain[0], refresh[0], AMORTIZE_PERIOD)

    # warmup_overhead_s: what warm-up cost beyond the steady-state price of the same calls (init call counted
    # whole): compilation and graph recording, cuBLAS/cuSOLVER/allocator initialisation. compile_s is CompiledSOAP's
    # own account (`compile_seconds`: wall time of the calls that compiled or recorded a graph).
    if plain[0] is not None:
        steady_ms = sum(n * (refresh[0] if k == "refresh" and refresh[0] else plain[0])
                        for k, n in warm["kinds"].items())
        row["warmup_overhead_s"] = max(0.0, warm["total_s"] - steady_ms / 1e3)
    own = getattr(r.opt, "compile_seconds", None)  # AdamW and the reference compile nothing: null
    row["compile_s"] = None if own is None else float(own)
    row["compile_unit"] = getattr(r.opt, "compile_unit", None)  # what compile_per chose: "plan" or "kind"

    variant = FLOP_VARIANT[r.name]
    fp, fr = flops.step_flops(shapes, variant, "plain"), flops.step_flops(shapes, variant, "refresh")
    fa = flops.amortized(fp, fr, AMORTIZE_PERIOD)
    row.update(flops_plain=fp, flops_refresh=fr, flops_amortized=fa)
    for key, fl, ms in [("tflops_plain", fp, plain[0]), ("tflops_refresh", fr, refresh[0]),
                        ("tflops", fa, row["amortized_step_ms"])]:
        row[key] = fl / (ms * 1e-3) / 1e12 if fl and ms else None

    if cuda and not args.nsys:  # torch.profiler and nsys both want CUPTI: under nsys read summarize.py instead
        log(f"{r.name}: torch.profiler over one refresh period")
        by_kind = {p["range"].rsplit("/", 1)[-1]: p for p in r.profile_cycle()}
        p, q = by_kind.get("plain") or {}, by_kind.get("refresh") or {}
        row.update(launches_per_step=p.get("launches_per"), graph_replays_per_step=p.get("graph_launches_per"),
                   kernels_per_step=p.get("kernels_per"), memcpy_per_step=p.get("memcpy_per"),
                   syncs_per_step=p.get("syncs_per"), launches_per_refresh_step=q.get("launches_per"),
                   graph_replays_per_refresh_step=q.get("graph_launches_per"),
                   kernels_per_refresh_step=q.get("kernels_per"))
        k_amort = flops.amortized(p.get("kernel_ms_per"), q.get("kernel_ms_per") if r.has_refresh else None,
                                  AMORTIZE_PERIOD)
        if k_amort is not None and row["amortized_step_ms"]:
            row["gpu_busy_fraction"] = k_amort / row["amortized_step_ms"]
    return row


def profiled_window(runners: list, args, device: torch.device) -> None:
    """Steady-state steps of every kept optimizer under torch.profiler (--torch-profile) or an nsys capture range
    (--nsys), one annotated range per step: "<optimizer>/step/<kind>"."""
    if args.torch_profile:
        acts = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts) as prof:
            for r in runners:
                for _ in range(args.steps):
                    r.annotated_step()
            sync(device)
        prof.export_chrome_trace(args.torch_profile)
        from . import summarize

        print(f"\ntorch.profiler trace: {args.torch_profile}")
        print(summarize.format_table(summarize.summarize(summarize.read_torch_trace(args.torch_profile))))
    if args.nsys:
        cudart = torch.cuda.cudart()
        sync(device)
        cudart.cudaProfilerStart()
        for r in runners:
            for _ in range(args.steps):
                r.annotated_step(nvtx_on=True)
        sync(device)
        cudart.cudaProfilerStop()
        log("nsys capture range closed")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m profiling.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="output JSON (default runs/bench-<preset>-<device>[-<orthogonalization>].json); "
                                   "the PNG goes next to it")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per repeat (>= --refresh-period)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS),
                    help="comma list from: " + ",".join(OPTIMIZERS))
    ap.add_argument("--matmul-precision", choices=["highest", "high"], default="highest",
                    help="torch.set_float32_matmul_precision; 'high' = TF32 (changes SOAP's numerics)")
    ap.add_argument("--refresh-period", type=int, default=4,
                    help="precondition_frequency used during the run (amortization always uses the default)")
    ap.add_argument("--warmup-cycles", type=int, default=None,
                    help="refresh periods of warm-up (default 3 for compiled-soap, 1 otherwise)")
    ap.add_argument("--orthogonalization", choices=ORTHOGONALIZATIONS, default="householder",
                    help="how the refresh orthonormalises F·Q, passed to CompiledSOAP (both rows) and to the "
                         "reference SOAP ('householder-outside-graph' is Householder QR for the reference)")
    ap.add_argument("--backend", default="inductor",
                    help="torch.compile backend of compiled-soap; 'aot_eager' traces without code generation "
                         "(CPU smoke runs: Inductor's C++ build takes minutes there; not a performance number)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for CPU runs; on a shared machine 1 avoids OpenMP spin-wait "
                         "contention (measured: 2 threads made a tiny AdamW step 40x slower under load)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nsys", action="store_true",
                    help="after timing, run --steps steps per optimizer inside cudaProfilerStart/Stop with NVTX "
                         "ranges (use with profiling/nsys_profile.sh)")
    ap.add_argument("--torch-profile", metavar="TRACE.json",
                    help="after timing, run --steps steps per optimizer under torch.profiler and write the trace")
    args = ap.parse_args(argv)
    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    bad = [o for o in args.optimizers if o not in OPTIMIZERS]
    if bad:
        ap.error(f"unknown optimizer(s) {bad}; choose from {list(OPTIMIZERS)}")
    if args.refresh_period < 2 or args.steps < args.refresh_period or args.repeats < 1:
        ap.error("need --refresh-period >= 2, --steps >= --refresh-period (so refresh steps get timed), --repeats >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    if args.nsys and args.device != "cuda":
        ap.error("--nsys needs --device cuda")
    if args.nsys and args.torch_profile:
        ap.error("--nsys and --torch-profile both use CUPTI; pick one")
    if not args.json:
        suffix = "" if args.orthogonalization == "householder" else f"-{args.orthogonalization}"
        args.json = os.path.join(report.REPO, "runs", f"bench-{args.preset}-{args.device}{suffix}.json")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_float32_matmul_precision(args.matmul_precision)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    preset = PRESETS[args.preset]
    shapes = [s for _, s in preset.shapes()]
    env = report.environment(device)
    env["matmul_tflops_ceiling"] = ceiling = matmul_ceiling(device)
    config = {"preset": preset.name, "preset_note": preset.note, "n_params": preset.numel(),
              "n_tensors": len(shapes), "qr_per_refresh": flops.n_factors(shapes), "steps": args.steps,
              "repeats": args.repeats, "refresh_period": args.refresh_period, "amortize_period": AMORTIZE_PERIOD,
              "optimizers": args.optimizers, "seed": args.seed, "backend": args.backend,
              "matmul_precision": args.matmul_precision, "orthogonalization": args.orthogonalization}
    log(f"{preset.name}: {preset.numel():,} params in {len(shapes)} tensors on {device}; "
        f"matmul ceiling {ceiling:.3f} TFLOP/s")

    grads = make_grads(preset, device, seed=args.seed + 1)
    rows, kept = [], []
    for name in args.optimizers:
        runner = None
        try:
            runner = Runner(name, preset, grads, device, args.refresh_period, seed=args.seed, backend=args.backend,
                            orthogonalization=args.orthogonalization)
            rows.append(measure(runner, shapes, args, ceiling))
            if name == "soap-reference" and reference_orthogonalization(args.orthogonalization) != \
                    args.orthogonalization:
                rows[-1]["notes"].append(f"reference SOAP ran orthogonalization="
                                         f"{reference_orthogonalization(args.orthogonalization)!r} (it has no graph)")
        except Unavailable as e:
            row = empty_row(preset.name, name)
            row.update(available=False, skipped=str(e))
            rows.append(row)
            log(f"{name}: skipped ({e})")
        except Exception as e:  # noqa: BLE001 - one broken optimizer must not hide the others' numbers
            traceback.print_exc()
            row = empty_row(preset.name, name)
            row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
            runner = None
        if runner is not None and (args.nsys or args.torch_profile):
            kept.append(runner)  # stays warm for the profiled window
        else:
            del runner
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    ref = next((r for r in rows if r["optimizer"] == "soap-reference" and r["amortized_step_ms"]), None)
    for r in rows:
        r["speedup_vs_reference"] = (ref["amortized_step_ms"] / r["amortized_step_ms"]
                                     if ref and r["amortized_step_ms"] else None)

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"env": env, "config": config, "rows": rows}, f, indent=1,
                  default=str)
    print(f"\n{preset.name} on {env['gpu_name'] or 'CPU'} ({env['torch']}), refresh period {args.refresh_period} "
          f"in the run, amortized at {AMORTIZE_PERIOD}, orthogonalization {args.orthogonalization}; "
          f"speedups = soap-reference time / row time")
    print(report.table(rows))
    png = report.chart(rows, os.path.splitext(args.json)[0] + ".png",
                       f"{preset.name} on {env['gpu_name'] or 'CPU'}, torch {env['torch']}")
    print(f"\nwrote {args.json}" + (f" and {png}" if png else " (no matplotlib: no chart)"))

    if kept:
        profiled_window(kept, args, device)
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
