#!/usr/bin/env python
"""Sharded CompiledSOAP: a small character-level transformer trained under FSDP2 (or DDP) on several ranks.

With torch.distributed initialised, CompiledSOAP shards its own work over the ranks: every parameter is owned by one
rank, which alone keeps its SOAP state and runs its step, and the updated parameters go back to every rank. Under
FSDP2 nothing else changes: call fully_shard, then build the optimizer from model.parameters().

    torchrun --standalone --nproc_per_node 2 examples/train_fsdp.py --save-at 100   # CPU (gloo): seconds
    torchrun --standalone --nproc_per_node 1 examples/train_fsdp.py \\
        --resume runs/train_fsdp/ckpt_step100 --out runs/train_fsdp_1rank            # the rest, on one rank

On CUDA machines each rank takes the GPU LOCAL_RANK (NCCL). A DCP checkpoint (model and optimizer, flattened, so it
reshards) is written after --save-at steps (default: at the end); --resume DIR continues from one, at any number of
ranks and with FSDP2 or --ddp. Rank 0 prints the loss and, once, how many parameters each rank owns and how much
SOAP state it keeps; it writes losses.json into --out.

The text is the source of Python's standard library, read as bytes (vocabulary: the 256 byte values), so nothing is
downloaded. The global batch of each step depends only on --seed and the step; each rank takes its rows of it, so
runs at different world sizes train on the same data (up to float rounding of the gradient average).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from compiled_soap import CompiledSOAP, factors_as_dicts

# Settings a resumed run must share with the run that wrote the checkpoint (the world size is not one of them).
SAME_ON_RESUME = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "steps", "lr", "weight_decay",
                  "precondition_frequency", "seed", "data_bytes")


# ----------------------------------------------------------------------------------------------------------- data

def load_text(max_bytes: int) -> torch.Tensor:
    """The first max_bytes of the standard library's .py files (sorted walk: the same bytes on every rank)."""
    root = os.path.dirname(os.__file__)
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        paths += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    chunks, total = [], 0
    for path in sorted(paths):
        if total >= max_bytes:
            break
        with open(path, "rb") as fh:
            chunks.append(fh.read()[: max_bytes - total])
        total += len(chunks[-1])
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


def local_batch(data: torch.Tensor, step: int, args, rank: int, world: int, device):
    """This rank's rows of the step's global batch, which depends only on (seed, step)."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    starts = torch.randint(len(data) - args.block_size - 1, (args.batch_size, 1), generator=g)
    rows = args.batch_size // world
    chunk = data[starts[rank * rows:(rank + 1) * rows] + torch.arange(args.block_size + 1)].long().to(device)
    return chunk[:, :-1], chunk[:, 1:]


# ---------------------------------------------------------------------------------------------------------- model

class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP, each added to the residual stream."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.qkv, self.proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    # No weight tying between the embedding and the head: FSDP2 would need both in one fully_shard unit.
    def __init__(self, args):
        super().__init__()
        self.tok_emb = nn.Embedding(256, args.n_embd)
        self.pos_emb = nn.Embedding(args.block_size, args.n_embd)
        self.blocks = nn.ModuleList(Block(args.n_embd, args.n_head) for _ in range(args.n_layer))
        self.ln_f = nn.LayerNorm(args.n_embd)
        self.head = nn.Linear(args.n_embd, 256, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets):
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(self.head(self.ln_f(x)).flatten(0, 1), targets.flatten())


# ----------------------------------------------------------------------------------------------------- checkpoint

def dcp_state(model, opt) -> dict:
    """Model and optimizer as DCP state_dicts. The optimizer's is flattened ("state.<fqn>.<key>" entries), which is
    what lets a checkpoint written at one world size load at another; it needs SOAP's factors as dicts
    (opt.register_state_dict_post_hook(factors_as_dicts)). Each rank contributes the entries of the parameters it
    owns. On a fresh optimizer this is also the template dcp.load fills in (torch initialises the state first)."""
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt, options=options)}


def save(path: Path, model, opt, step: int, losses: list, args, rank: int) -> None:
    dcp.save(dcp_state(model, opt), checkpoint_id=str(path))  # collective: every rank writes its own part
    if rank == 0:
        meta = {"step": step, "losses": losses, "config": {k: getattr(args, k) for k in SAME_ON_RESUME}}
        (path / "meta.json").write_text(json.dumps(meta, indent=1))
    dist.barrier()


def resume(path: Path, model, opt, args) -> tuple[int, list]:
    meta = json.loads((path / "meta.json").read_text())
    here = {k: getattr(args, k) for k in SAME_ON_RESUME}
    if meta["config"] != here:
        diff = ", ".join(f"--{k.replace('_', '-')} {meta['config'].get(k)} there, {here[k]} here" for k in here
                         if meta["config"].get(k) != here[k])
        raise SystemExit(f"--resume {path}: a resumed run needs the same settings ({diff})")
    state = dcp_state(model, opt)
    dcp.load(state, checkpoint_id=str(path))  # every rank reads what its shards and its owned parameters need
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"], options=StateDictOptions(flatten_optimizer_state_dict=True))
    return meta["step"], meta["losses"]


# ------------------------------------------------------------------------------------------------------- training

def lr_at(step: int, args) -> float:
    """Linear warm-up over the first 5% of the steps, then cosine decay to 10%: a function of the step alone, so a
    resumed run needs no scheduler state."""
    warmup = max(1, args.steps // 20)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup))))


def show_sharding(opt, model, mode: str, rank: int, world: int) -> list:
    """Gather, per rank, how many parameters it owns and how many bytes of SOAP state it keeps; print on rank 0."""
    params = list(model.parameters())
    owned = opt.owned_parameters()
    leaves = torch.utils._pytree.tree_leaves(opt.state_dict()["state"])  # this rank's entries only
    mine = {"params": len(owned), "elements": sum(params[i].numel() for i in owned),
            "state_bytes": sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        total = sum(r["state_bytes"] for r in everyone)
        print(f"CompiledSOAP sharded over {world} rank(s) ({mode}): {len(params)} parameters, "
              f"{sum(p.numel() for p in params):,} elements, SOAP state {total / 2**20:.2f} MiB in all")
        for r, s in enumerate(everyone):
            print(f"  rank {r}: owns {s['params']:>3} parameters ({s['elements']:>9,} elements), "
                  f"keeps {s['state_bytes'] / 2**20:.2f} MiB of SOAP state")
    return everyone


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the world size {world}")
    log = print if rank == 0 else (lambda *a, **k: None)
    mode = "ddp" if args.ddp else "fsdp"

    data = load_text(args.data_bytes)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = GPT(args).to(device)
    log(f"{world} rank(s), {device.type}, {mode}: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{len(data):,} bytes of text")
    if args.ddp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        mesh = init_device_mesh(device.type, (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)  # each block gathers its parameters for its own forward and backward
        fully_shard(model, mesh=mesh)  # the rest: embeddings, final LayerNorm, head

    # Nothing sharding-specific here: under torch.distributed the optimizer shards its work by itself.
    opt = CompiledSOAP(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                       precondition_frequency=args.precondition_frequency, compile=args.compile,
                       backend=args.backend)
    opt.register_state_dict_post_hook(factors_as_dicts)  # the layout DCP can flatten (see dcp_state)

    start, losses = 0, []
    if args.resume:
        start, losses = resume(Path(args.resume), model, opt, args)
        log(f"resumed from {args.resume} at step {start}")

    out = Path(args.out)
    sharding, t0, timed = None, None, 0
    for step in range(start, args.steps):
        x, y = local_batch(data, step, args, rank, world, device)
        loss = model(x, y)  # the mean over this rank's rows; FSDP2 and DDP average the gradients over the ranks
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        opt.step()
        opt.zero_grad(set_to_none=True)

        reported = loss.detach().clone()
        dist.all_reduce(reported)  # the loss of the whole global batch (SUM: gloo has no AVG)
        losses.append(reported.item() / world)
        if sharding is None:  # after the first step, which initialised the state
            sharding = show_sharding(opt, model, mode, rank, world)
            t0, timed = time.perf_counter(), 0  # the first step only initialises the state: left out of ms/step
        else:
            timed += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            ms = (time.perf_counter() - t0) / timed * 1e3 if timed else float("nan")
            log(f"step {step + 1:>5}/{args.steps}  loss {losses[-1]:.4f}  lr {lr_at(step, args):.2e}  {ms:.1f} ms/step")
        if step + 1 == args.save_at:
            path = out / f"ckpt_step{step + 1}"
            save(path, model, opt, step + 1, losses, args, rank)
            log(f"saved {path}")

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "losses.json").write_text(json.dumps(
            {"world_size": world, "mode": mode, "start_step": start, "losses": losses, "sharding": sharding}))
    # Everything that holds the process group goes first, and the group last: freed at interpreter exit instead,
    # a gloo worker thread could be destroyed unjoined ("terminate called without an active exception", seen once
    # in a test run on 2 loaded cores).
    del opt, model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16, help="global batch: split evenly over the ranks")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--lr", type=float, default=6e-3, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--precondition-frequency", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-bytes", type=int, default=2_000_000, help="how much of the standard library to read")
    p.add_argument("--ddp", action="store_true", help="replicate the model with DDP instead of FSDP2's fully_shard")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="CompiledSOAP(compile=...). Default: on with CUDA, off on CPU (Inductor's C++ build of the "
                        "step takes minutes there)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend with --compile")
    p.add_argument("--out", default="runs/train_fsdp", help="losses.json and checkpoints go here")
    p.add_argument("--save-at", type=int, default=None, help="write a DCP checkpoint after this step (default: last)")
    p.add_argument("--resume", help="a checkpoint directory written by --save-at (any world size, FSDP2 or DDP)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per rank (0: torch's default)")
    args = p.parse_args(argv)
    if args.compile is None:
        args.compile = torch.cuda.is_available()
    if args.save_at is None:
        args.save_at = args.steps
    return args


if __name__ == "__main__":
    main()
