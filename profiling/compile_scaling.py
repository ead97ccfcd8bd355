"""Compile seconds against the number of distinct parameter shapes, cold and warm cache, side by side.

    python -m profiling.compile_scaling --shapes 8,16,32,64 [--compile-per plan,kind] [--baseline PATH]
        [--json out.json]

Each measurement is a fresh process (no Dynamo or Inductor state carried over) on N/2 Linear layers of distinct
shapes (a weight and a bias each: N distinct shapes, so N buckets), precondition_frequency 4, synthetic gradients,
one thread. "cold" starts from an empty TORCHINDUCTOR_CACHE_DIR; "warm" is a second process on the cache the cold
one left. Per process: the wall time of every step() call, CompiledSOAP's `compile_seconds`, and from them the
first plain call (call 2), the first refresh (call f + 1 = 5) against the median of later refresh calls, and the
steady plain step.

--compile-per measures each of CompiledSOAP's compile units (`compile_per`: one graph per plan, or one compiled
function per kind of bucket) side by side.
--baseline runs another checkout of compiled_soap (a path to its repository root) the same way, interleaved with
this one, so both columns come from one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

FREQUENCY = 4
CALLS = 4 * FREQUENCY + 2  # refreshes at calls 5, 9, 13, 17 (call 1 initialises)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shapes_of(n_shapes: int) -> list[tuple]:
    """N/2 Linear layers, every weight and bias shape distinct."""
    out = []
    for i in range(n_shapes // 2):
        out += [(16 + i, 24 + i), (16 + i,)]
    return out


def measure(n_shapes: int, backend: str = "inductor", compile_per: str = "plan") -> dict:
    """In this process: CALLS steps of CompiledSOAP on `shapes_of(n_shapes)`, each call timed."""
    import torch

    import compiled_soap
    from compiled_soap import CompiledSOAP

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes_of(n_shapes)]
    unit = {} if compile_per == "plan" else {"compile_per": compile_per}  # a baseline checkout may predate it
    opt = CompiledSOAP(params, precondition_frequency=FREQUENCY, backend=backend, **unit)
    seconds, kinds = [], []
    for call in range(CALLS):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        start = time.perf_counter()
        opt.step()
        seconds.append(time.perf_counter() - start)
        kinds.append(opt.last_step_kind)
    refresh = [s for s, k in zip(seconds, kinds) if k == "refresh"]
    plain = [s for s, k in zip(seconds, kinds) if k == "plain"]
    first_plain = kinds.index("plain")
    package = os.path.dirname(os.path.dirname(os.path.abspath(compiled_soap.__file__)))
    return {"shapes": n_shapes, "package": package, "compile_s": opt.compile_seconds, "kinds": kinds,
            "call_s": seconds, "first_plain_call_s": seconds[first_plain],
            "first_refresh_call_s": refresh[0], "steady_refresh_s": statistics.median(refresh[1:]),
            "steady_plain_s": statistics.median(plain[1:])}


def _spawn(checkout: str, n_shapes: int, backend: str, compile_per: str, cache_dir: str, timeout_s: float) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "PYTHONPATH": checkout, "OMP_NUM_THREADS": "1"}
    # This file is loaded by its path and the process starts in the checkout, so `compiled_soap` is the checkout's.
    code = ("import importlib.util, json, sys; spec = importlib.util.spec_from_file_location('scaling', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print('RESULT ' + json.dumps(m.measure(int(sys.argv[2]), sys.argv[3], sys.argv[4])))")
    start = time.perf_counter()
    argv = [sys.executable, "-c", code, os.path.abspath(__file__), str(n_shapes), backend, compile_per]
    proc = subprocess.run(argv, env=env, cwd=checkout, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {n_shapes} shapes in {checkout} failed:\n{proc.stderr[-4000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return {**json.loads(line[len("RESULT "):]), "process_s": time.perf_counter() - start}


def run(shape_counts: list[int], checkouts: dict, units: list[str], backend: str, timeout_s: float) -> list[dict]:
    rows = []
    for n in shape_counts:
        for name, checkout in checkouts.items():
            for unit in units:
                with tempfile.TemporaryDirectory(prefix="inductor-cache-") as cache:
                    for cache_state in ("cold", "warm"):
                        r = _spawn(checkout, n, backend, unit, cache, timeout_s)
                        rows.append({"checkout": f"{name}, per {unit}", "cache": cache_state, **r})
                        print(f"[compile_scaling] {name} per {unit}, {n} shapes {cache_state}: {r['compile_s']:.1f} s",
                              file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| checkout | shapes | cache | compile s | call 2 s | first refresh s | steady refresh ms | "
            "first/steady refresh | steady plain ms |")
    lines = [head, "|---" * 9 + "|"]
    for r in rows:
        lines.append(f"| {r['checkout']} | {r['shapes']} | {r['cache']} | {r['compile_s']:.2f} | "
                     f"{r['first_plain_call_s']:.2f} | {r['first_refresh_call_s']:.3f} | "
                     f"{1e3 * r['steady_refresh_s']:.2f} | {r['first_refresh_call_s'] / r['steady_refresh_s']:.1f}x | "
                     f"{1e3 * r['steady_plain_s']:.2f} |")
    cold = {(r["checkout"], r["shapes"]): r["compile_s"] for r in rows if r["cache"] == "cold"}
    counts = sorted({n for _, n in cold})
    if len(counts) > 1:
        lo, hi = counts[0], counts[-1]
        for name in dict.fromkeys(c for c, _ in cold):
            if (name, lo) in cold and (name, hi) in cold:
                lines.append(f"\n{name}: cold compile at {hi} shapes / at {lo} shapes = "
                             f"{cold[(name, hi)] / cold[(name, lo)]:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8,16,32,64", help="numbers of distinct shapes (even), comma-separated")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    ap.add_argument("--compile-per", default="plan", help="CompiledSOAP compile_per values, comma-separated")
    ap.add_argument("--baseline", help="repository root of another checkout to measure beside this one")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds allowed per measuring process")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.shapes.split(",")]
    if any(n < 2 or n % 2 for n in counts):
        ap.error(f"--shapes must be even numbers >= 2, got {args.shapes}")
    checkouts = {"this": ROOT}
    if args.baseline:
        checkouts["baseline"] = os.path.abspath(args.baseline)
    rows = run(counts, checkouts, args.compile_per.split(","), args.backend, args.timeout)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python -m profiling.compile_scaling " + " ".join(argv or sys.argv[1:]),
                       "backend": args.backend, "frequency": FREQUENCY, "rows": rows}, f, indent=1)
    print(table(rows))


if __name__ == "__main__":
    main()
