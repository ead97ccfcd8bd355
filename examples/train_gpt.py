#!/usr/bin/env python
"""Train a small character-level GPT with AdamW, SOAP and CompiledSOAP, and compare them.

The corpus is the source of Python's own standard library (*.py files, read as bytes), so the example needs no
download and runs on any machine. Every optimizer starts from the same initial weights and sees the same batches.

CPU (the default; about three minutes on two cores for all three optimizers):

    python examples/train_gpt.py --out runs/cpu

GPU, a GPT-2-small-sized model (12 layers, 768 wide, ~86M parameters with the 256-byte vocabulary):

    python examples/train_gpt.py --device cuda --out runs/gpu \\
        --n-layer 12 --n-head 12 --n-embd 768 --block-size 512 --batch-size 32 \\
        --steps 2000 --lr 3e-3 --data-bytes 0 --eval-batches 50

Outputs in --out: summary.json (final/validation loss, step time, throughput per optimizer) and loss.png (loss
against step and against training wall-clock time). With --save-every N a checkpoint ckpt_<optimizer>.pt is written
every N steps; --resume PATH (that file, or the directory holding them) continues each run exactly where it stopped.

Profiling: --nsys (CUDA only) calls cudaProfilerStart once the warm-up steps are over and cudaProfilerStop at the
end of each optimizer's run, with NVTX ranges around forward/backward and the optimizer step. profiling/nsys_profile.sh
captures the first such range only, so profile one optimizer at a time:

    profiling/nsys_profile.sh -o runs/gpt_nsys -- \
        python examples/train_gpt.py --device cuda --optimizers compiled-soap --steps 60 --nsys
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import compiled_soap

OPTIMIZERS = ("adamw", "soap", "compiled-soap")


# ----------------------------------------------------------------------------------------------------------- data

def load_corpus(max_bytes: int, val_every: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard library's .py files as one byte stream; every `val_every`-th file is held out for validation.

    Holding out whole files (rather than the tail of the stream) keeps the validation text unseen but of the same mix.
    The walk is sorted, so the corpus is the same on every run on the same Python version.
    """
    root = os.path.dirname(os.__file__)
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Third-party packages differ from machine to machine: keep only the standard library itself.
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        paths += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    paths.sort()
    train, val, total = [], [], 0
    for i, path in enumerate(paths):
        if total >= max_bytes:
            break
        with open(path, "rb") as fh:
            data = fh.read()[: max_bytes - total]
        total += len(data)
        (val if i % val_every == val_every - 1 else train).append(data)
    to_tensor = lambda chunks: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
    return to_tensor(train), to_tensor(val)


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator, device):
    """Random windows of block_size + 1 bytes: inputs and next-byte targets."""
    starts = torch.randint(len(data) - block_size - 1, (batch_size, 1), generator=generator)
    chunk = data[starts + torch.arange(block_size + 1)].long()
    return chunk[:, :-1].to(device, non_blocking=True), chunk[:, 1:].to(device, non_blocking=True)


def train_batch(data, step: int, args, device):
    # The batch depends only on (seed, step): every optimizer sees the same data in the same order, and a resumed
    # run draws exactly the batches the uninterrupted run would have drawn.
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    return get_batch(data, args.batch_size, args.block_size, g, device)


# ---------------------------------------------------------------------------------------------------------- model

class SelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        assert n_embd % n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.out = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.shape
        heads = lambda t: t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q, k, v = map(heads, self.qkv(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying: one matrix embeds and un-embeds
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # Small init; the projections that write into the residual stream are scaled down with depth so the
                # stream's variance does not grow with the number of layers (GPT-2's recipe).
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("attn.out.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets=None):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


# ------------------------------------------------------------------------------------------------------ optimizer

def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the matrices of Linear layers only.

    Biases and LayerNorm gains are scales and offsets, and decaying embeddings (here also the tied output head) pulls
    rare tokens towards zero: the usual practice is to leave them all undecayed. named_parameters() lists the tied
    matrix once, so no parameter lands in two groups.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(name: str, model: nn.Module, args, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, args.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    soap_args = dict(lr=args.lr, betas=(0.95, 0.95), precondition_frequency=args.precondition_frequency)
    if name == "soap":
        return compiled_soap.SOAP(groups, **soap_args)
    if name == "compiled-soap":
        # Same hyperparameters as SOAP: CompiledSOAP is a drop-in replacement that computes the same update.
        return compiled_soap.CompiledSOAP(groups, **soap_args, compile=args.compile, backend=args.backend,
                                          orthogonalization=args.orthogonalization)
    raise ValueError(f"unknown optimizer {name!r}")


def lr_schedule(args):
    """Linear warm-up to the peak lr, then cosine decay to 10% of it, as a multiplier for LambdaLR."""
    warmup = max(1, round(args.warmup_frac * args.steps))

    def factor(step: int) -> float:  # step = number of scheduler.step() calls so far (0 for the first update)
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, args.steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def step_kind(opt: torch.optim.Optimizer) -> str:
    """What the last optimizer step was: "init", "plain" or "refresh" (the eigenbasis update every f steps).

    CompiledSOAP reports it; for SOAP it is read from the state; AdamW only has plain steps. Timing needs it because
    each kind is compiled (and, on CUDA, captured) separately, so each has its own warm-up.
    """
    kind = getattr(opt, "last_step_kind", None)
    if kind is not None:
        return kind
    if isinstance(opt, compiled_soap.SOAP):
        for s in opt.state.values():
            if "Q" in s:
                if s["step"] == 0:
                    return "init"
                return "refresh" if s["step"] % s["precondition_frequency"] == 0 else "plain"
    return "plain"


# ------------------------------------------------------------------------------------------------------- training

def save_checkpoint(path: Path, name, step, model, opt, sched, history, args, device) -> None:
    ckpt = {
        "optimizer_name": name,
        "step": step,  # optimizer steps done
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        # No dropout here, so nothing random happens after the initialisation; saving the generators anyway is what
        # makes a resume exact once a model does use them.
        "rng": {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None},
        "history": history,
        "model_config": model_config(args),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind if the run is killed while saving


def model_config(args) -> dict:
    """Everything a resumed run must share with the original to continue it identically."""
    keys = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "seed", "steps", "lr", "weight_decay",
            "warmup_frac", "grad_clip", "precondition_frequency", "data_bytes")
    return {k: getattr(args, k) for k in keys}


@torch.no_grad()
def evaluate(model, val_data, args, device, autocast) -> float:
    model.eval()
    g = torch.Generator().manual_seed(args.seed + 12345)  # the same validation batches for every optimizer
    losses = []
    for _ in range(args.eval_batches):
        x, y = get_batch(val_data, args.batch_size, args.block_size, g, device)
        with autocast():
            losses.append(model(x, y).item())
    model.train()
    return sum(losses) / len(losses)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train(name: str, init_state: dict, data, args, device, resume: str | None) -> dict:
    from tqdm import tqdm

    train_data, val_data = data
    model = GPT(256, args.block_size, args.n_layer, args.n_head, args.n_embd).to(device)
    model.load_state_dict(init_state)  # every optimizer starts from the same weights
    opt = make_optimizer(name, model, args, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(args))
    use_bf16 = device.type == "cuda" and args.autocast
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext

    # Per step: train loss, training time so far (s), optimizer step (ms), whole step (ms), kind, warm-up or not.
    history = {"loss": [], "time_s": [], "opt_ms": [], "step_ms": [], "kind": [], "warmup": []}
    start = 0
    if resume:
        ckpt = torch.load(resume, map_location="cpu", weights_only=True)
        saved, now = ckpt["model_config"], model_config(args)
        if saved != now:
            diff = ", ".join(f"{k}={saved.get(k)!r} there, {now[k]!r} here" for k in now if saved.get(k) != now[k])
            sys.exit(f"--resume {resume}: a resumed run needs the same settings ({diff})")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        history, start = ckpt["history"], ckpt["step"]
        print(f"{name}: resumed from {resume} at step {start}")

    seen = {}  # kind -> steps of that kind timed in this process (a resumed run compiles afresh)
    elapsed = history["time_s"][-1] if history["time_s"] else 0.0
    profiling = False
    bar = tqdm(range(start, args.steps), desc=f"{name:>13}", initial=start, total=args.steps, mininterval=0.5,
               dynamic_ncols=True)
    for step in bar:
        x, y = train_batch(train_data, step, args, device)
        sync(device)
        t0 = time.perf_counter()
        with nvtx(args, f"{name}/forward_backward"):
            with autocast():
                loss = model(x, y)
            loss.backward()
        # Clip the global gradient norm before the optimizer sees the gradients; it keeps the rare bad batch from
        # throwing the moments (and SOAP's Kronecker factors) off.
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        sync(device)
        t1 = time.perf_counter()
        with nvtx(args, f"{name}/step"):
            opt.step()
        sync(device)
        t2 = time.perf_counter()
        # Any zero_grad style works (CompiledSOAP copies the gradients in at every step). They differ only for a
        # parameter that gets no gradient in a step: None skips it, a zero gradient still decays its moments. Every
        # parameter of this model gets a gradient at every step, so the choice changes no number here.
        opt.zero_grad(set_to_none=False)
        sched.step()  # the optimizers read lr from their param groups at every step, so schedulers just work

        kind = step_kind(opt)
        seen[kind] = seen.get(kind, 0) + 1
        # The first few steps of each kind include compilation/graph capture (or, for the eager optimizers, allocator
        # and cache warm-up): time them separately.
        warm = seen[kind] <= args.timing_warmup
        elapsed += t2 - t0
        history["loss"].append(loss.item())
        history["time_s"].append(elapsed)
        history["opt_ms"].append((t2 - t1) * 1e3)
        history["step_ms"].append((t2 - t0) * 1e3)
        history["kind"].append(kind)
        history["warmup"].append(warm)
        bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", step_ms=f"{(t2 - t0) * 1e3:.0f}", kind=kind)

        if args.nsys and not profiling and step + 1 >= args.profile_from:
            torch.cuda.cudart().cudaProfilerStart()  # steps after this one are the measured (steady-state) ones
            profiling = True
        if args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(Path(args.out) / f"ckpt_{name}.pt", name, step + 1, model, opt, sched, history, args,
                            device)
    bar.close()
    if profiling:
        sync(device)
        torch.cuda.cudart().cudaProfilerStop()

    val_loss = evaluate(model, val_data, args, device, autocast)
    result = summarize(history, val_loss, args)
    result["compile_s"] = getattr(opt, "compile_seconds", None)  # CompiledSOAP's own count, this process only
    return result


def nvtx(args, label: str):
    # NVTX ranges go around (never inside) the compiled optimizer step; only emitted when profiling.
    return torch.cuda.nvtx.range(label) if args.nsys else nullcontext()


def summarize(history: dict, val_loss: float, args) -> dict:
    steady = [i for i, w in enumerate(history["warmup"]) if not w]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    by_kind = {}
    for kind in sorted(set(history["kind"]) - {"init"}):
        ms = [history["opt_ms"][i] for i in steady if history["kind"][i] == kind]
        if ms:
            by_kind[kind] = mean(ms)
    steady_s = sum(history["step_ms"][i] for i in steady) / 1e3
    tail = history["loss"][-10:]
    return {
        "final_loss": mean(tail),  # mean train loss of the last 10 steps (a single step is noisy)
        "val_loss": val_loss,
        "step_ms": mean([history["opt_ms"][i] for i in steady]),  # optimizer step, warm-up steps excluded
        "step_ms_by_kind": by_kind,
        "tokens_per_s": len(steady) * args.batch_size * args.block_size / steady_s if steady_s else float("nan"),
        "warmup_s": sum(history["opt_ms"][i] for i, w in enumerate(history["warmup"]) if w) / 1e3,
        "train_s": history["time_s"][-1] if history["time_s"] else 0.0,
        "first_loss": history["loss"][0],
        "steps": len(history["loss"]),
        "losses": history["loss"],
        "time_s": history["time_s"],
    }


# -------------------------------------------------------------------------------------------------------- reports

def print_table(results: dict) -> None:
    header = f"{'optimizer':<14}{'train loss':>11}{'val loss':>10}{'tokens/s':>11}{'step ms':>9}{'warm-up s':>11}"
    print("\n" + header + "\n" + "-" * len(header))
    for name, r in results.items():
        print(f"{name:<14}{r['final_loss']:>11.4f}{r['val_loss']:>10.4f}{r['tokens_per_s']:>11.0f}"
              f"{r['step_ms']:>9.2f}{r['warmup_s']:>11.2f}")
    print("train loss: mean of the last 10 steps; step ms: optimizer.step() alone, warm-up steps excluded;\n"
          "warm-up s: time in the first steps of each kind (initialisation, compilation, graph capture).")


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_step, ax_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, r in results.items():
        # Per-step character-level loss is noisy: draw it faintly, with an exponential moving average on top.
        smooth, ema = [], None
        for v in r["losses"]:
            ema = v if ema is None else 0.9 * ema + 0.1 * v
            smooth.append(ema)
        steps = range(1, len(smooth) + 1)
        # SOAP and CompiledSOAP compute the same update, so their curves coincide: dash one to keep both visible.
        style = "--" if name == "compiled-soap" else "-"
        (line,) = ax_step.plot(steps, smooth, style, label=name)
        ax_step.plot(steps, r["losses"], color=line.get_color(), alpha=0.2, linewidth=0.8)
        ax_time.plot(r["time_s"], smooth, style, color=line.get_color(), label=name)
    ax_step.set(xlabel="step", ylabel="train loss (nats per byte)", title="loss against step")
    ax_time.set(xlabel="training time, s (compilation included)", title="loss against wall-clock time")
    for ax in (ax_step, ax_time):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma list of " + ", ".join(OPTIMIZERS))
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--out", default="runs/train_gpt", help="directory for summary.json, loss.png and checkpoints")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--lr", type=float, default=6e-3, help="peak learning rate, the same for every optimizer")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-frac", type=float, default=0.05, help="fraction of the steps spent in lr warm-up")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--precondition-frequency", type=int, default=10, help="SOAP's eigenbasis refresh period")
    p.add_argument("--orthogonalization", default="householder",
                   choices=["householder", "cholesky", "householder-outside-graph"],
                   help="CompiledSOAP's refresh orthogonalisation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-bytes", type=int, default=8_000_000, help="cap on the corpus size (0: all of it)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default). 1 is faster on a small, busy CPU")
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--timing-warmup", type=int, default=3,
                   help="leave the first N steps of each kind (init/plain/refresh) out of the step timings")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="CompiledSOAP(compile=...); --no-compile runs its eager path")
    p.add_argument("--backend", default=None,
                   help="CompiledSOAP's torch.compile backend. Default: inductor on CUDA (CUDA graphs), aot_eager on "
                        "CPU, where Inductor's C++ build of the two step graphs takes minutes and gains nothing")
    p.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast for the forward pass on CUDA (the parameters and optimizer stay fp32)")
    p.add_argument("--save-every", type=int, default=0, help="write --out/ckpt_<optimizer>.pt every N steps")
    p.add_argument("--resume", help="a checkpoint file, or a directory of ckpt_<optimizer>.pt files")
    p.add_argument("--nsys", action="store_true", help="cudaProfilerStart/Stop around the measured steps (CUDA)")
    p.add_argument("--profile-from", type=int, default=None,
                   help="with --nsys: first profiled step (default: after 3 refresh periods, warm-up done)")
    args = p.parse_args(argv)
    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    for o in args.optimizers:
        if o not in OPTIMIZERS:
            p.error(f"unknown optimizer {o!r}; choose from {', '.join(OPTIMIZERS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch.cuda.is_available() is False")
    if args.nsys and args.device != "cuda":
        p.error("--nsys needs --device cuda")
    if args.backend is None:
        args.backend = "inductor" if args.device == "cuda" else "aot_eager"
    if args.profile_from is None:
        args.profile_from = args.timing_warmup * args.precondition_frequency + 2
    return args


def resume_paths(resume: str | None, names: list[str]) -> dict[str, str]:
    """Which checkpoint each optimizer resumes from."""
    if not resume:
        return {}
    path = Path(resume)
    if path.is_dir():
        found = {n: str(path / f"ckpt_{n}.pt") for n in names if (path / f"ckpt_{n}.pt").exists()}
    else:
        found = {torch.load(path, map_location="cpu", weights_only=True)["optimizer_name"]: str(path)}
    if not set(found) & set(names):
        sys.exit(f"--resume {resume}: no checkpoint for any of {', '.join(names)}")
    return found


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    names = list(args.optimizers)
    if "compiled-soap" in names and getattr(compiled_soap, "CompiledSOAP", None) is None:
        print("compiled-soap skipped: this build of compiled_soap has no CompiledSOAP", file=sys.stderr)
        names.remove("compiled-soap")
    if not names:
        sys.exit("no optimizer left to run")
    resumes = resume_paths(args.resume, names)

    data = load_corpus(args.data_bytes if args.data_bytes > 0 else sys.maxsize)
    print(f"corpus: {len(data[0]):,} train / {len(data[1]):,} validation bytes from {os.path.dirname(os.__file__)}")
    torch.manual_seed(args.seed)
    init = GPT(256, args.block_size, args.n_layer, args.n_head, args.n_embd)
    init_state = copy.deepcopy(init.state_dict())
    print(f"model: {sum(p.numel() for p in init.parameters()):,} parameters, device {device}")

    results = {}
    for name in names:
        torch.manual_seed(args.seed)  # identical RNG streams for every optimizer
        results[name] = train(name, init_state, data, args, device, resumes.get(name))

    print_table(results)
    (out / "summary.json").write_text(json.dumps({"optimizers": results}, indent=1))
    plot(results, out / "loss.png")
    print(f"wrote {out / 'summary.json'} and {out / 'loss.png'}")
    return results


if __name__ == "__main__":
    main()
