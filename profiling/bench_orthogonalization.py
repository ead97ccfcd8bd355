"""Householder QR vs batched CholeskyQR for SOAP's eigenbasis refresh, side by side, at the presets' factor sizes.

    python -m profiling.bench_orthogonalization --device cpu                       # CPU subset: 64, 256, 768
    python -m profiling.bench_orthogonalization --device cuda --sizes gpt2-small,pr118-h1024 --batch 16

For each size d, a stack of --batch factors F (d x d, PSD: G G^T of a rank-16-plus-noise gradient, the spectrum
presets.make_grads describes) with an old basis Q (the eigenvectors of an earlier factor) is timed three ways:
  orth     orthogonalisation alone, on the sorted P = F Q[:, order]
  refresh  P = F Q, estimated eigenvalues diag(Q^T P), argsort, gather, orthogonalisation (the refresh's own work)
  plain    the matmuls of a plain SOAP step for the --batch/2 square d x d parameters these factors belong to:
           project G (Q_L^T G Q_R), project back, factor update G G^T and G^T G = 3 units of 4d^3 = 6 matmuls
refresh/plain is what a refresh costs in plain steps (precondition_frequency=1 pays it on every step). Model GFLOP
come from compiled_soap.orthogonalization.flops. |Q^T Q - I| is measured on these inputs in float64.
Times are medians of torch.utils.benchmark (which synchronises CUDA); matmuls run in full fp32 (no TF32).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess

import torch
import torch.utils.benchmark as benchmark

from compiled_soap.orthogonalization import ORTHOGONALIZATIONS, flops, full_precision_matmul

from .bench_report import command_line
from .flop_model import factor_sizes
from .presets import PRESETS

METHODS = ("householder", "cholesky")


def parse_sizes(text: str) -> list[int]:
    """Comma list of sizes and/or preset names (a preset stands for the sizes of its Kronecker factors)."""
    sizes: set[int] = set()
    for item in filter(None, (t.strip() for t in text.split(","))):
        if item in PRESETS:
            for _, shape in PRESETS[item].shapes():
                sizes.update(s for s in factor_sizes(shape) if s and len(shape) == 2)
        else:
            sizes.add(int(item))
    return sorted(sizes)


def make_factors(d: int, batch: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """F (this refresh's factors) and Q (eigenvectors of the factors one period earlier), built in float64."""
    g = torch.Generator().manual_seed(seed)

    def factor():
        rank = min(16, d)
        a = torch.randn(batch, d, rank, generator=g, dtype=torch.float64)
        b = torch.randn(batch, rank, d, generator=g, dtype=torch.float64)
        grad = (a / torch.arange(1, rank + 1, dtype=torch.float64)) @ b
        grad = grad / grad.square().mean((-2, -1), keepdim=True).sqrt()
        grad = grad + 0.1 * torch.randn(batch, d, d, generator=g, dtype=torch.float64)
        return grad @ grad.mT

    f_old, f = factor(), factor()
    q = torch.linalg.eigh(0.5 * f_old + 0.5 * f)[1].flip(-1)
    return f.to(device, dtype), q.to(device, dtype), torch.randn(batch, d, d, generator=g).to(device, dtype)


def sorted_power_step(f, q):
    p = f @ q
    order = torch.argsort((q * p).sum(-2), dim=-1, descending=True)
    return torch.gather(p, -1, order.unsqueeze(-2).expand_as(p))


def refresh(f, q, method):
    return ORTHOGONALIZATIONS[method](sorted_power_step(f, q))


def plain(q, g):
    """The matmuls of a plain step for the parameters g[i] whose factor bases are q[2i] (left) and q[2i + 1]."""
    ql, qr = q[0::2], q[1::2]
    projected = ql.mT @ g @ qr
    back = ql @ projected @ qr.mT
    return back, g @ g.mT, g.mT @ g


def median_ms(fn, threads: int, min_time: float) -> float:
    fn()  # warm-up (allocator, lazy init, cuBLAS / cuSOLVER handles)
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_time).median * 1e3


def orthogonality_error(q: torch.Tensor) -> float:
    q = q.double()
    return (q.mT @ q - torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)).abs().max().item()


def header(args, device: torch.device) -> list[str]:
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = platform.processor() or "unknown CPU"
        try:
            with open("/proc/cpuinfo") as fh:
                hardware = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        commit += " (uncommitted changes in tracked files)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return [
        f"date     {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"torch    {torch.__version__}",
        f"device   {device.type}: {hardware}; torch threads {args.threads}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        f"commit   {commit}",
        f"command  {command_line()}",
        f"dtype    {args.dtype}; batch {args.batch} factors per size; min run time {args.min_time} s per timing",
    ]


def run(args) -> None:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    print("\n".join(header(args, device) + [""]), flush=True)
    cols = ("d", "orth ms H", "C", "H/C", "refresh ms H", "C", "H/C", "plain ms", "refr/plain H", "C",
            "GFLOP orth H", "C", "GFLOP refr H", "C", "GFLOP plain", "|QtQ-I| H", "C")
    widths = (5, 10, 9, 6, 13, 9, 6, 9, 13, 6, 13, 8, 13, 8, 12, 10, 9)
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)), flush=True)
    for d in args.sizes:
        f, q, g = make_factors(d, args.batch, dtype, device)
        p = sorted_power_step(f, q)
        ms, err = {}, {}
        for m in METHODS:
            fn = ORTHOGONALIZATIONS[m]
            ms["orth", m] = median_ms(lambda: fn(p), args.threads, args.min_time)
            ms["refresh", m] = median_ms(lambda: refresh(f, q, m), args.threads, args.min_time)
            err[m] = orthogonality_error(fn(p))
        ms["plain"] = median_ms(lambda: plain(q, g[: args.batch // 2]), args.threads, args.min_time)
        model = {m: flops(m, d, dtype) * args.batch / 1e9 for m in METHODS}
        model_refresh = {m: model[m] + 2 * d**3 * args.batch / 1e9 for m in METHODS}
        model_plain = 12 * d**3 * (args.batch // 2) / 1e9
        h, c = "householder", "cholesky"
        row = (d, ms["orth", h], ms["orth", c], ms["orth", h] / ms["orth", c],
               ms["refresh", h], ms["refresh", c], ms["refresh", h] / ms["refresh", c], ms["plain"],
               ms["refresh", h] / ms["plain"], ms["refresh", c] / ms["plain"],
               model[h], model[c], model_refresh[h], model_refresh[c], model_plain, err[h], err[c])
        fmt = ("{:d}", "{:.3f}", "{:.3f}", "{:.2f}", "{:.3f}", "{:.3f}", "{:.2f}", "{:.3f}", "{:.2f}", "{:.2f}",
               "{:.3g}", "{:.3g}", "{:.3g}", "{:.3g}", "{:.3g}", "{:.1e}", "{:.1e}")
        print("  ".join(fm.format(v).rjust(w) for fm, v, w in zip(fmt, row, widths)), flush=True)
    print("\nH = householder (torch.linalg.qr), C = cholesky; H/C > 1 means cholesky is faster.\n"
          "refr/plain: refresh time over the plain step's matmul time for the same parameters.", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m profiling.bench_orthogonalization",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes("64,256,768"),
                        help="comma list of factor sizes and/or preset names (tiny, gpt2-small, pr118-h1024, ...)")
    parser.add_argument("--batch", type=int, default=2, help="factors per stack (even: pairs make the parameters)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 on a shared machine)")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of timed runs per measurement")
    args = parser.parse_args(argv)
    if args.batch < 2 or args.batch % 2:
        parser.error("--batch must be an even number >= 2")
    with full_precision_matmul():
        run(args)


if __name__ == "__main__":
    main()
