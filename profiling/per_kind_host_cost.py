"""Host cost of compiling once per kind of bucket instead of once over all buckets (issue 27, docs/design.md §7).

    python -m profiling.per_kind_host_cost --shapes 4,16 [--calls 3000] [--options today,dynamo,standalone,...]

A toy bucket step stands in for the real one (batched matmul, Adam-like update, batched matmul, state updated in
place; float32, B = 2), on K buckets of K distinct shapes of one kind. Each option runs a whole step over the K
buckets; after warm-up and a check against eager, the options are timed in interleaved rounds and the median
milliseconds per step are printed side by side, with the ratio to today's design:

- today:          one static torch.compile over the loop of buckets (what stacked.step does now)
- dynamo:         one torch.compile(dynamic=True) for the kind, called once per bucket
- standalone:     the kind traced once with symbolic sizes (make_fx) and compiled by Inductor's standalone_compile:
                  no Dynamo frame at call time, so no guards and no frame entry
- standalone-cpp: the same, generated with Inductor's cpp_wrapper

CPU only, one thread: on a GPU one CUDA graph replay hides the host cost whatever the option.
"""

from __future__ import annotations

import argparse
import statistics
import time
import types

import torch

LR, BETA1, BETA2, EPS = 1e-3, 0.9, 0.95, 1e-8
OPTIONS = ("today", "dynamo", "standalone", "standalone-cpp")


def bucket_step(p, g, m, v, q) -> None:
    rotated = g @ q
    m_new = m * BETA1 + rotated * (1 - BETA1)
    v_new = v * BETA2 + rotated * rotated * (1 - BETA2)
    p.sub_(LR * ((m_new / (v_new.sqrt() + EPS)) @ q.transpose(1, 2)))
    m.copy_(m_new)
    v.copy_(v_new)


def make_buckets(k: int, seed: int = 0) -> list:
    """K buckets of distinct shapes, every size >= 2 (sizes 0 and 1 would be specialised by the tracers)."""
    gen = torch.Generator().manual_seed(seed)
    buckets = []
    for i in range(k):
        n, m = 6 + i, 4 + i % 3
        q = torch.linalg.qr(torch.randn(2, m, m, generator=gen))[0].contiguous()
        buckets.append([torch.randn(2, n, m, generator=gen), torch.randn(2, n, m, generator=gen),
                        torch.zeros(2, n, m), torch.zeros(2, n, m), q])
    return buckets


def _own_code(fn):
    # Dynamo caches compiled code on the code object: each compiled callable gets a code object of its own.
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _loop(step):
    def whole(buckets):
        for b in buckets:
            step(*b)
    return whole


def _standalone(example: list, cpp_wrapper: bool):
    """The kind's step traced with symbolic sizes and compiled without Dynamo: one artifact for every size."""
    import torch._inductor.config as inductor_config
    from torch.fx.experimental.proxy_tensor import make_fx

    def returns_nothing(*args):
        bucket_step(*args)
        return ()

    graph = make_fx(returns_nothing, tracing_mode="symbolic")(*example)
    fakes = [n.meta["val"] for n in graph.graph.nodes if n.op == "placeholder"]
    with inductor_config.patch(cpp_wrapper=cpp_wrapper):  # standalone_compile's own options refuse it
        return torch._inductor.standalone_compile(graph, fakes, dynamic_shapes="from_example_inputs",
                                                  fake_mode=fakes[0].fake_mode, options={})


def build(option: str, buckets: list):
    if option == "today":
        return torch.compile(_own_code(_loop(bucket_step)), fullgraph=True, dynamic=False, backend="inductor")
    if option == "dynamo":
        return _loop(torch.compile(_own_code(bucket_step), fullgraph=True, dynamic=True, backend="inductor"))
    if option in ("standalone", "standalone-cpp"):
        return _loop(_standalone(buckets[0], cpp_wrapper=option == "standalone-cpp"))
    raise ValueError(f"unknown option {option!r}; known: {', '.join(OPTIONS)}")


def measure(k: int, options: list, calls: int, rounds: int = 3) -> dict:
    """{option: (median ms per step, seconds to build and make the first call)}; each checked against eager."""
    torch.set_num_threads(1)
    want = make_buckets(k)
    _loop(bucket_step)(want)
    runs, cold = {}, {}
    for option in options:
        buckets = make_buckets(k)
        start = time.perf_counter()
        step = build(option, buckets)  # standalone_compile compiles here, torch.compile at the first call
        step(buckets)
        cold[option] = time.perf_counter() - start
        for got, ref in zip(buckets, want):
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for _ in range(20):
            step(buckets)
        runs[option] = (step, buckets)
    samples = {o: [] for o in options}
    for _ in range(rounds):  # interleaved, so that a change in the machine's load reaches every option alike
        for option, (step, buckets) in runs.items():
            for _ in range(calls // rounds):
                start = time.perf_counter()
                step(buckets)
                samples[option].append(time.perf_counter() - start)
    return {o: (1e3 * statistics.median(samples[o]), cold[o]) for o in options}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4,16", help="numbers of buckets (distinct shapes), comma-separated")
    parser.add_argument("--calls", type=int, default=3000, help="timed steps per option")
    parser.add_argument("--options", default=",".join(OPTIONS))
    args = parser.parse_args(argv)
    options = args.options.split(",")
    print(f"torch {torch.__version__}, one thread; median ms per whole step (ms per bucket, ratio to 'today'); "
          "setup: seconds to build and make the first call (compiling)")
    print("| buckets | " + " | ".join(options) + " |")
    print("|---" * (len(options) + 1) + "|")
    for k in (int(x) for x in args.shapes.split(",")):
        result = measure(k, options, args.calls)
        base = result.get("today", (None,))[0]
        cells = []
        for o in options:
            ms, cold = result[o]
            ratio = f", {ms / base:.2f}x" if base else ""
            cells.append(f"{ms:.3f} ({ms / k:.3f}{ratio}); setup {cold:.1f} s")
        print(f"| {k} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
