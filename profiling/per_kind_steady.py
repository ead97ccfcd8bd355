"""What symbolic sizes cost in steady state: each bucket's per-kind artifact against one traced at its exact sizes.

    python -m profiling.per_kind_steady --preset gpt2-l4-d256 [--steps plain,refresh] [--repeats 5]

compile_per="kind" runs every bucket through its kind's artifact, whose kernels were generated for symbolic sizes;
a per-plan graph's kernels know every size. This builds a preset's buckets (CompiledSOAP, compile=False, three
calls so that every state is initialised), then, per bucket, times in interleaved rounds: the kind's artifact,
an artifact of the same function traced at the bucket's exact sizes (same options, same pipeline), and the eager
bucket step. Medians in ms per bucket, the whole step as their sum, and the ratio symbolic / exact. Each call
updates the bucket's state as a step would (the values stay those of a training run). One thread, CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from compiled_soap import CompiledSOAP, stacked
from compiled_soap.kinds import PER_KIND_INDUCTOR_OPTIONS, KindCompiler

from .presets import PRESETS, make_grads, make_params

FORMS = ("symbolic", "exact", "eager")


def buckets_of(preset: str, period: int = 4):
    """A preset's plans, bucket tensors and hyperparameters after three calls (initialised, stepped)."""
    device = torch.device("cpu")
    params, grads = make_params(PRESETS[preset], device), make_grads(PRESETS[preset], device)
    opt = CompiledSOAP(params, precondition_frequency=period, compile=False)
    for _ in range(3):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return opt._plans, opt._bucket_tensors, opt._hyper.hyper


def measure(preset: str, step: str, repeats: int, backend: str = "inductor", max_buckets: int = 0) -> list[dict]:
    plans, buckets, hyper = buckets_of(preset)
    if max_buckets:
        plans, buckets = plans[:max_buckets], buckets[:max_buckets]
    refreshing = (step == "refresh",) * len(plans)
    compiler = KindCompiler(backend, PER_KIND_INDUCTOR_OPTIONS if backend == "inductor" else {})
    rows = []
    for plan, (kwargs, args) in zip(plans, stacked.bucket_calls(plans, buckets, hyper, refreshing, "householder")):
        symbolic, tensors = compiler.bind(stacked.bucket_step, kwargs, args)
        exact, _ = compiler.compile_exact(stacked.bucket_step, kwargs, args)
        forms = {"symbolic": lambda: symbolic.run(*tensors), "exact": lambda: exact.run(*tensors),
                 "eager": lambda: stacked.bucket_step(*args, **kwargs)}
        for run in forms.values():  # first calls: allocator, caches
            run()
        samples = {name: [] for name in forms}
        for _ in range(repeats):
            for name, run in forms.items():
                start = time.perf_counter()
                run()
                samples[name].append(time.perf_counter() - start)
        rows.append({"shape": tuple(plan.layout.shape), "items": int(tensors[0].shape[0]),
                     **{name: statistics.median(s) * 1e3 for name, s in samples.items()}})
    return rows


def table(rows: list[dict], step: str) -> str:
    lines = [f"| {step} bucket | items | " + " | ".join(f"{f} ms" for f in FORMS) + " | symbolic / exact |",
             "|---" * (len(FORMS) + 3) + "|"]
    for r in rows:
        cells = " | ".join(f"{r[f]:.3f}" for f in FORMS)
        lines.append(f"| {r['shape']} | {r['items']} | {cells} | {r['symbolic'] / r['exact']:.3f}x |")
    total = {f: sum(r[f] for r in rows) for f in FORMS}
    cells = " | ".join(f"{total[f]:.3f}" for f in FORMS)
    lines.append(f"| whole step | | {cells} | {total['symbolic'] / total['exact']:.3f}x |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2-l4-d256", choices=sorted(PRESETS))
    parser.add_argument("--steps", default="plain,refresh", help="plain, refresh or both, comma-separated")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per bucket and form (medians)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of both artifacts")
    parser.add_argument("--max-buckets", type=int, default=0, help="only the first N buckets (0: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{args.preset}, torch {torch.__version__}, {args.backend}, one thread: median ms per bucket call")
    for step in args.steps.split(","):
        print(table(measure(args.preset, step, args.repeats, args.backend, args.max_buckets), step), flush=True)


if __name__ == "__main__":
    main()
