"""Host-side costs of CompiledSOAP, side by side with the reference, in one run.

Three tables:
  1. host microseconds per steady-state step at 12 / 48 / 192 / 768 parameters (tiny tensors, so device work is
     negligible): CompiledSOAP with its compiled call replaced by a no-op (what the host adds around one graph
     replay: intake, masks, hyperparameters, the two batched copies), against the reference SOAP's whole step;
  2. the compiled step graphs at 1 / 4 / 16 / 48 transformer layers: Dynamo and ATen node counts, tracing seconds
     (backend aot_eager), and, with --inductor, Inductor's compile seconds (CPU code generation; cold cache unless
     TORCHINDUCTOR_CACHE_DIR points at a warm one);
  3. the refresh schedule: refresh graphs run in 101 calls at f=10 (the host decides from its own clock; 10 due).

    python -m profiling.bench_host [--device cpu|cuda] [--inductor] [--layers 1 4 16 48] [--params 12 48 192 768]

With --device cuda the parameters live on the GPU: table 1 is then wall time per step with the device synchronised
at the end of each timed block (the host's launches, and the reference's small kernels), table 2 traces CUDA graphs.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from compiled_soap import SOAP, CompiledSOAP, stacked

from .bench_report import environment

DEVICE = torch.device("cpu")  # set by main(); the tables build their parameters here


def _params(n, d=8, gen=None):
    shapes = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d), (d,), (d,)]
    # Drawn on the CPU (same values on every device), then moved.
    return [torch.nn.Parameter(torch.randn(shapes[i % len(shapes)], generator=gen).to(DEVICE)) for i in range(n)]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _time_steps(opt, params, steps=60, repeats=5):
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # first call: initialises (CompiledSOAP: the buckets, where gradients land from now on)
    opt.zero_grad()
    sum((p * torch.randn_like(p)).sum() for p in params).backward()  # gradients as a training loop leaves them
    for _ in range(2):
        opt.step()
    samples = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        for _ in range(steps):
            opt.step()
        _sync()
        samples.append((time.perf_counter() - start) / steps * 1e6)
    return statistics.median(samples)


class _CopyTimer:
    """Times torch._foreach_copy_ while active: on CPU the batched copies are device work done by the host (one
    copy per tensor); on CUDA they are a few multi-tensor kernel launches."""

    def __init__(self):
        self.seconds, self._original = 0.0, torch._foreach_copy_

    def __enter__(self):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self._original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        torch._foreach_copy_ = timed
        return self

    def __exit__(self, *exc):
        torch._foreach_copy_ = self._original


@contextlib.contextmanager
def _without_graph():
    original = stacked.step
    stacked.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        stacked.step = original


def host_table(counts):
    print("| parameters | CompiledSOAP around the graph us/step | of which batched copies | host logic per "
          "parameter us | SOAP (reference) us/step |")
    print("|---|---|---|---|---|")
    for n in counts:
        gen = torch.Generator().manual_seed(0)
        params = _params(n, gen=gen)
        opt = CompiledSOAP(params, compile=False, precondition_frequency=10**6)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()  # the initialisation call: no graph yet
        steps, repeats = 60, 5
        # The host around the graph, not the graph: the step function (compiled_soap.stacked.step, which the
        # optimizer looks up when it builds its graph at the first plain step) does nothing while measured.
        with _CopyTimer() as copies, _without_graph():
            host = _time_steps(opt, params, steps, repeats)
        copy_us = copies.seconds / ((steps * repeats) + 3) * 1e6
        ref_params = _params(n, gen=torch.Generator().manual_seed(0))
        ref = _time_steps(SOAP(ref_params, precondition_frequency=10**6), ref_params, steps=10, repeats=3)
        print(f"| {n} | {host:.0f} | {copy_us:.0f} | {(host - copy_us) / n:.2f} | {ref:.0f} |")


class _CountingBackend:
    """A torch.compile backend that counts the nodes of each graph, Dynamo's and AOTAutograd's (ATen), and runs
    it like backend="aot_eager"."""

    def __init__(self):
        self.counts = []

    def __call__(self, gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._functorch.aot_autograd import aot_module_simplified

        entry = {"dynamo": len(gm.graph.nodes)}
        self.counts.append(entry)

        def forward(fw_gm, _inputs):
            entry["aten"] = len(fw_gm.graph.nodes)
            return make_boxed_func(fw_gm.forward)

        return aot_module_simplified(gm, example_inputs, fw_compiler=forward, keep_inference_input_mutations=True)


def graph_table(layer_counts, inductor):
    print("| layers | parameters | graph | Dynamo nodes | ATen nodes | tracing s | Inductor compile s |")
    print("|---|---|---|---|---|---|---|")
    for layers in layer_counts:
        params = _params(6 * layers, gen=torch.Generator().manual_seed(0))
        backend = _CountingBackend()
        opt = CompiledSOAP(params, precondition_frequency=2, backend=backend)
        seconds = []
        for _ in range(3):  # init, plain (traced), refresh (traced)
            for p in params:
                p.grad = torch.randn_like(p)
            before = opt.compile_seconds
            opt.step()
            seconds.append(opt.compile_seconds - before)
        inductor_s = ["-", "-"]
        if inductor:
            torch._dynamo.reset()
            ind = CompiledSOAP(params, precondition_frequency=2, mode=None)
            for i in range(3):
                for p in params:
                    p.grad = torch.randn_like(p)
                before = ind.compile_seconds
                ind.step()
                if i:
                    inductor_s[i - 1] = f"{ind.compile_seconds - before:.1f}"
        for kind, count, s, ind_s in zip(("plain", "refresh"), backend.counts, seconds[1:], inductor_s):
            print(f"| {layers} | {len(params)} | {kind} | {count['dynamo']} | {count['aten']} | {s:.1f} | {ind_s} |")


def schedule_table():
    params = _params(6, gen=torch.Generator().manual_seed(0))
    opt = CompiledSOAP(params, compile=False, precondition_frequency=10)
    kinds = []
    for _ in range(101):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        kinds.append(opt.last_step_kind)
    print(f"refresh graphs in 101 calls at f=10: {kinds.count('refresh')} (due: 10); plain: {kinds.count('plain')}")


def main(argv=None):
    global DEVICE
    ap = argparse.ArgumentParser(prog="python -m profiling.bench_host", description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, nargs="+", default=[12, 48, 192, 768])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 4, 16, 48])
    ap.add_argument("--inductor", action="store_true", help="also time Inductor's compilation (minutes on CPU)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where the parameters live (cuda: wall time per step, synchronised per timed block)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    env = environment(DEVICE)
    for key in ("date", "command", "commit", "dirty", "torch", "cuda", "device", "gpu_name", "driver", "python"):
        print(f"{key:8s} {env[key]}")
    print(f"threads  {args.threads}\n")
    host_table(args.params)
    print()
    graph_table(args.layers, args.inductor)
    print()
    schedule_table()


if __name__ == "__main__":
    main()
