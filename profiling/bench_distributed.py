"""Sharded CompiledSOAP across W ranks: per-rank state, FLOPs, exchange bytes and optimizer step time, side by side.

    python -m profiling.bench_distributed [--worlds 1,2,4] [--width 256] [--hidden 512] [--layers 3] [--compile]

For each world size W, W processes are spawned on 127.0.0.1 (gloo, FileStore rendezvous; `--device cuda`: NCCL, one
GPU per rank) and each runs, one after the other, three cases on the same model (a residual MLP: an input Linear,
`--layers` blocks LayerNorm -> Linear(width, hidden) -> GELU -> Linear(hidden, width), a LayerNorm and an output
Linear, fp32, MSE loss on a fixed random batch split over the ranks):

    ddp              DistributedDataParallel, CompiledSOAP's default (sharded when W > 1): replicated
                     parameters, each owned by one rank, which steps it; the updates are all_gathered after the step;
    ddp shard=False  the same with every rank running the whole step (the baseline the sharding is measured against);
    fsdp2            fully_shard per block and on the root: DTensor parameters sharded on dim 0, all_to_all_single
                     before the step (rows of parameters and gradients to their owners) and after it (rows back).

Per case and W it reports
- state: bytes of the tensors in each rank's `optimizer.state_dict()` (max over ranks), next to total/W and the bound
  total/W + the largest item (total and items from `compiled_soap.ownership.state_bytes` over the model's parameters);
- FLOPs: per rank the sum of `compiled_soap.ownership.item_flops` (amortised at the precondition frequency) over
  `optimizer.owned_parameters()` (max over ranks), next to total/W and total/W + the costliest item;
- exchange: bytes each rank sends to the others per step in CompiledSOAP's collectives, counted from the buffers
  it hands to them during the timed steps (the wrappers' own traffic is not counted), next to what must move
  without any padding, computed from the owners (replicated: each owned parameter to the W-1 others; dim-0 sharded:
  each rank's rows of every parameter and gradient another rank owns to that owner, and the owner's update rows
  back). Per rank, needed <= sent <= one collective per class of same-shape parameters padded to m slots (m = the
  most items of the class one rank owns): checked and printed;
- time: wall clock of `opt.step()` alone (forward, backward and the wrappers' own collectives are outside it; the
  ranks meet at a barrier before each step), per step the max over ranks, then the median (and mean) over the timed
  steps after the warm-up; and its ratio to the same case at W=1 and, for the sharded DDP rows, to shard=False.

`main(argv)` prints the table and returns its rows (tests/test_bench_distributed.py checks them).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from compiled_soap import CompiledSOAP
from compiled_soap import sharding
from compiled_soap.hyperparameters import DEFAULTS
from compiled_soap.ownership import item_flops, state_bytes

CASES = (("ddp", None), ("ddp", False), ("fsdp2", None))  # (wrapper, CompiledSOAP's shard argument)
TIMEOUT = datetime.timedelta(seconds=120)


# ------------------------------------------------------------------------------------------------------ model


class Block(torch.nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.fc = torch.nn.Linear(width, hidden)
        self.proj = torch.nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.proj(torch.nn.functional.gelu(self.fc(self.norm(x))))


def build_model(width: int, hidden: int, layers: int) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(width, width), *[Block(width, hidden) for _ in range(layers)],
                               torch.nn.LayerNorm(width), torch.nn.Linear(width, width))


def hyper_group(precondition_frequency: int) -> dict:
    """The param group the optimizer gets (library defaults but the frequency): what the cost model reads."""
    return {**DEFAULTS, "precondition_frequency": precondition_frequency}


def _wrap(model, how: str, device: torch.device):
    model = model.to(device)
    if how == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model:
            if isinstance(block, Block):
                fully_shard(block)
        fully_shard(model)
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def _batch(step: int, rank: int, world: int, batch: int, width: int, device):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(batch, width, generator=gen)
    y = torch.randn(batch, width, generator=gen)
    rows = slice(rank * batch // world, (rank + 1) * batch // world)
    return x[rows].to(device), y[rows].to(device)


# ------------------------------------------------------------------------------------------------------ counting


@contextlib.contextmanager
def counting_exchange(world: int, tally: list):
    """Count the bytes this rank sends to the others in the optimizer's collectives (compiled_soap.sharding's
    all_gather and all_to_all_single), from the buffers handed to them: an all_gather delivers its input to the W-1
    other ranks; an all_to_all_single sends its input but the part addressed to this rank (its own split, or 1/W of
    dim 0 without splits)."""
    gather, to_all = sharding._all_gather, dist.all_to_all_single

    def counted_gather(out, inp, *args, **kwargs):
        tally.append(inp.numel() * inp.element_size() * (world - 1))
        return gather(out, inp, *args, **kwargs)

    def counted_all_to_all(out, inp, output_split_sizes=None, input_split_sizes=None, group=None, **kwargs):
        rank = dist.get_rank(group)
        row = inp[0].numel() if inp.dim() and inp.shape[0] else 0
        own = input_split_sizes[rank] * row if input_split_sizes else inp.numel() // world
        tally.append((inp.numel() - own) * inp.element_size())
        return to_all(out, inp, output_split_sizes, input_split_sizes, group=group, **kwargs)

    sharding._all_gather, dist.all_to_all_single = counted_gather, counted_all_to_all
    try:
        yield
    finally:
        sharding._all_gather, dist.all_to_all_single = gather, to_all


def _rows_on(shape, rank: int, world: int) -> int:
    """Rows of dim 0 on `rank` as FSDP2's Shard(0) splits it (torch.chunk: ceil(d0/W) per rank, the last short)."""
    per = -(-shape[0] // world)
    return min(per, max(0, shape[0] - rank * per))


def exchange_needed(shapes: list, itemsizes: list, owners: list, world: int, fsdp: bool) -> list:
    """Per rank, the bytes it must send per step in the sharded exchange, without any padding. Replicated: its owned
    parameters to each of the W-1 others. Dim-0 sharded: before the step its rows of every parameter (and
    gradient) another rank owns, to that owner; after it, as owner, every other rank's rows of the update."""
    sent = [0] * world
    for shape, itemsize, owner in zip(shapes, itemsizes, owners):
        n = math.prod(shape)
        for r in range(world):
            if not fsdp:
                sent[r] += (world - 1) * n * itemsize if r == owner else 0
            elif r != owner:
                sent[r] += 2 * _rows_on(shape, r, world) * (n // shape[0]) * itemsize
            else:
                sent[r] += (n - _rows_on(shape, r, world) * (n // shape[0])) * itemsize
    return sent


def exchange_padded(shapes: list, itemsizes: list, owners: list, world: int, fsdp: bool) -> int:
    """Bytes one rank sends per step with one collective per class of same-shape parameters, every rank padded to m
    slots (m = the most items of the class one rank owns) and dim-0 shards to ceil(d0/W) rows: the first Exchange
    design's buffers, an upper bound of any exchange without padding beyond them."""
    classes: dict = {}
    for i, (shape, itemsize) in enumerate(zip(shapes, itemsizes)):
        classes.setdefault((tuple(shape), itemsize), []).append(i)
    total = 0
    for (shape, itemsize), members in classes.items():
        slots = max(sum(1 for i in members if owners[i] == r) for r in range(world))
        if fsdp:
            total += 3 * (world - 1) * slots * -(-shape[0] // world) * math.prod(shape[1:]) * itemsize
        else:
            total += (world - 1) * slots * math.prod(shape) * itemsize
    return total


def _tensor_bytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(tree)
               if isinstance(t, torch.Tensor))


# ------------------------------------------------------------------------------------------------------ worker


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_case(rank, world, how, shard, cfg, device) -> dict:
    model = _wrap(build_model(cfg["width"], cfg["hidden"], cfg["layers"]), how, device)
    opt = CompiledSOAP(model.parameters(), precondition_frequency=cfg["precondition_frequency"],
                       compile=cfg["compile"], shard=shard)
    times, kinds, sent = [], [], []
    for step in range(cfg["warmup"] + cfg["steps"]):
        timed = step >= cfg["warmup"]
        opt.zero_grad(set_to_none=True)
        x, y = _batch(step, rank, world, cfg["batch"], cfg["width"], device)
        torch.nn.functional.mse_loss(model(x), y).backward()
        _sync(device)
        dist.barrier()
        with counting_exchange(world, sent) if timed else contextlib.nullcontext():
            start = time.perf_counter()
            opt.step()
            _sync(device)
            elapsed = time.perf_counter() - start
        if timed:
            times.append(elapsed)
            kinds.append(opt.last_step_kind)
    owned = opt.owned_parameters()
    out = {"times": times, "kinds": kinds, "owned": owned, "state_bytes": _tensor_bytes(opt.state_dict()["state"]),
           "sent_per_step": sum(sent) / cfg["steps"], "collectives_per_step": len(sent) / cfg["steps"],
           "sharded": opt.sharded}
    del model, opt
    gc.collect()
    return out


def _worker(rank, world, folder, cfg):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    device = torch.device("cpu")
    backend = "gloo"
    if cfg["device"] == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    dist.init_process_group(backend, store=dist.FileStore(os.path.join(folder, "store"), world), rank=rank,
                            world_size=world, timeout=TIMEOUT)
    torch.set_num_threads(cfg["threads"])
    try:
        results = {f"{how}/{shard}": _run_case(rank, world, how, shard, cfg, device) for how, shard in CASES}
        everyone = [None] * world
        dist.all_gather_object(everyone, results)
        if rank == 0:
            with open(os.path.join(folder, "result.json"), "w") as f:
                json.dump(everyone, f)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, cfg: dict, deadline_s: float) -> list:
    with tempfile.TemporaryDirectory() as folder:
        context = mp.spawn(_worker, args=(world, folder, cfg), nprocs=world, join=False)
        deadline = time.monotonic() + deadline_s
        try:
            while not context.join(timeout=1):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"world size {world} still running after {deadline_s:.0f} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
                    process.join(10)
        with open(os.path.join(folder, "result.json")) as f:
            return json.load(f)


# ------------------------------------------------------------------------------------------------------ report


def _rows(world: int, per_rank: list, model, group: dict) -> list:
    params = list(model.parameters())
    shapes, dtypes = [tuple(p.shape) for p in params], [p.dtype for p in params]
    itemsizes = [p.element_size() for p in params]
    item_state = [state_bytes(s, d, group) for s, d in zip(shapes, dtypes)]
    item_cost = [item_flops(s, group) for s in shapes]
    rows = []
    for how, shard in CASES:
        ranks = [r[f"{how}/{shard}"] for r in per_rank]
        owners = [None] * len(params)
        for r, res in enumerate(ranks):
            for i in res["owned"]:
                owners[i] = r if owners[i] is None else -1  # -1: owned twice (shard=False: by every rank)
        sharded = ranks[0]["sharded"]
        step_max = [max(res["times"][k] for res in ranks) for k in range(len(ranks[0]["times"]))]
        rows.append({
            "mode": how if shard is None else f"{how} shard={shard}", "wrapper": how, "shard": shard,
            "world": world, "sharded": sharded,
            "owned": [res["owned"] for res in ranks],
            "state_bytes": [res["state_bytes"] for res in ranks],
            "state_total": sum(item_state), "state_largest": max(item_state),
            "flops": [sum(item_cost[i] for i in res["owned"]) for res in ranks],
            "flops_total": sum(item_cost), "flops_largest": max(item_cost),
            "sent": [res["sent_per_step"] for res in ranks],
            "collectives_per_step": max(res["collectives_per_step"] for res in ranks),
            "sent_needed": (exchange_needed(shapes, itemsizes, owners, world, how == "fsdp2") if sharded
                            else [0] * world),
            "sent_padded": exchange_padded(shapes, itemsizes, owners, world, how == "fsdp2") if sharded else 0,
            "step_ms_median": 1e3 * statistics.median(step_max), "step_ms_mean": 1e3 * statistics.fmean(step_max),
            "refresh_steps": ranks[0]["kinds"].count("refresh"), "timed_steps": len(step_max),
        })
    return rows


def _ratios(rows: list) -> None:
    base = {r["mode"]: r["step_ms_median"] for r in rows if r["world"] == 1}
    unsharded = {r["world"]: r["step_ms_median"] for r in rows if r["mode"] == "ddp shard=False"}
    for r in rows:
        r["vs_w1"] = r["step_ms_median"] / base[r["mode"]] if r["mode"] in base else None
        r["vs_unsharded"] = (r["step_ms_median"] / unsharded[r["world"]]
                             if r["mode"] == "ddp" and r["world"] in unsharded else None)


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(rows: list) -> str:
    head = ["mode", "W", "state KiB/rank", "total/W", "bound", "MFLOP/rank", "total/W", "bound",
            "sent KiB/rank/step", "needed", "collectives", "step ms median", "mean", "vs W=1", "vs shard=False"]
    lines = [head]
    for r in rows:
        w = r["world"]
        lines.append([
            r["mode"], str(w),
            _fmt(max(r["state_bytes"]) / 1024, ",.1f"), _fmt(r["state_total"] / w / 1024, ",.1f"),
            _fmt((r["state_total"] / w + r["state_largest"]) / 1024, ",.1f"),
            _fmt(max(r["flops"]) / 1e6, ",.2f"), _fmt(r["flops_total"] / w / 1e6, ",.2f"),
            _fmt((r["flops_total"] / w + r["flops_largest"]) / 1e6, ",.2f"),
            _fmt(max(r["sent"]) / 1024, ",.1f"), _fmt(max(r["sent_needed"]) / 1024, ",.1f"),
            _fmt(r["collectives_per_step"], "g"),
            _fmt(r["step_ms_median"], ".2f"), _fmt(r["step_ms_mean"], ".2f"),
            _fmt(r["vs_w1"], ".2f"), _fmt(r["vs_unsharded"], ".2f"),
        ])
    widths = [max(len(line[k]) for line in lines) for k in range(len(head))]
    out = ["  ".join(c.ljust(wd) if k == 0 else c.rjust(wd) for k, (c, wd) in enumerate(zip(line, widths)))
           for line in lines]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def _environment(device: str) -> dict:
    from profiling.bench_report import environment

    env = environment(torch.device(device))
    return {k: env[k] for k in ("date", "command", "commit", "dirty", "torch", "cuda", "gpu_name", "python")} | {
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible"}


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(prog="python -m profiling.bench_distributed", description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="1,2,4", help="world sizes, comma-separated (default 1,2,4)")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=512, help="the blocks' inner width")
    ap.add_argument("--layers", type=int, default=3, help="residual blocks")
    ap.add_argument("--batch", type=int, default=64, help="global batch, split over the ranks")
    ap.add_argument("--precondition-frequency", type=int, default=DEFAULTS["precondition_frequency"])
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps first (default 3; with --compile 2f+2, so both graphs are compiled and "
                         "recorded)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    ap.add_argument("--compile", action="store_true",
                    help="CompiledSOAP(compile=True) (Inductor; minutes on CPU: for the GPU machine)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: NCCL, rank r on cuda:r (needs a GPU per rank)")
    ap.add_argument("--deadline-s", type=float, default=600, help="per world size, for all its processes")
    args = ap.parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",")]
    if args.device == "cuda" and torch.cuda.device_count() < max(worlds):
        ap.error(f"--device cuda needs a GPU per rank: W up to {max(worlds)}, {torch.cuda.device_count()} GPUs")
    warmup = args.warmup if args.warmup is not None else (2 * args.precondition_frequency + 2 if args.compile else 3)
    cfg = {"width": args.width, "hidden": args.hidden, "layers": args.layers, "batch": args.batch,
           "precondition_frequency": args.precondition_frequency, "warmup": warmup, "steps": args.steps,
           "threads": args.threads, "compile": args.compile, "device": args.device}

    for key, value in _environment(args.device).items():
        print(f"{key:8s} {value}")
    model = build_model(args.width, args.hidden, args.layers)
    n = sum(p.numel() for p in model.parameters())
    print(f"model    residual MLP, width {args.width}, hidden {args.hidden}, {args.layers} blocks: {n:,} fp32 "
          f"parameters in {len(list(model.parameters()))} tensors; batch {args.batch}")
    print(f"run      {args.device}, {'NCCL' if args.device == 'cuda' else 'gloo on 127.0.0.1'}; "
          f"{args.threads} thread(s) per rank; compile={args.compile}; precondition_frequency "
          f"{args.precondition_frequency}; {warmup} warm-up + {args.steps} timed steps per case\n", flush=True)

    rows = []
    for world in worlds:
        start = time.perf_counter()
        rows += _rows(world, _spawn(world, cfg, args.deadline_s), model, hyper_group(args.precondition_frequency))
        print(f"[W={world}] {time.perf_counter() - start:.1f} s", flush=True)
    _ratios(rows)
    rows.sort(key=lambda r: ([c[0] if c[1] is None else f"{c[0]} shard={c[1]}" for c in CASES].index(r["mode"]),
                             r["world"]))
    print()
    print(table(rows))
    refreshes = sorted({(r["refresh_steps"], r["timed_steps"]) for r in rows})
    print(f"\nstate: tensors of each rank's state_dict() (max over ranks); bound = total/W + largest item. MFLOP: "
          f"cost model per step, amortised at f={args.precondition_frequency}, of the rank's owned_parameters() "
          f"(max over ranks); bound = total/W + costliest item. sent: bytes a rank sends to the others per step in "
          f"CompiledSOAP's exchange (DDP's and FSDP2's own gradient and parameter traffic not included); "
          f"collectives: the exchange's per step. step ms: wall time of opt.step(), max over ranks per step, "
          f"median (mean) over the timed steps, refresh steps among them: "
          + ", ".join(f"{k} of {t}" for k, t in refreshes) + ".")
    outside = [(r["mode"], r["world"]) for r in rows
               if not all(n <= c <= r["sent_padded"] for n, c in zip(r["sent_needed"], r["sent"]))]
    print("sent: counted from the buffers CompiledSOAP handed to its collectives in the timed steps (max over ranks); "
          "needed: the same computed from the owners without padding (each owned parameter to the W-1 others; FSDP2: "
          "each rank's rows of another's parameter and gradient to its owner, and the owner's update back). Per "
          "rank, needed <= sent <= one padded collective per class of same-shape parameters: "
          + ("holds." if not outside else f"FAILS for {outside}."))
    if args.device == "cpu":
        print(f"note: on CPU all ranks share this machine's {os.cpu_count()} cores, so at W > {os.cpu_count()} (and "
              f"at W > 1 with other work running) wall times are contention-bound: only the state, FLOP and bytes "
              f"columns are meaningful there. The GPU machine, if lent, runs the same command (16 cores, no "
              f"contention up to W=4); --device cuda needs one GPU per rank.")
    if 1 in worlds:
        print("At W=1, 'ddp' and 'ddp shard=False' are the same configuration (a 1-rank group is not sharded): the "
              "difference between their times is the run's noise.")
    return rows


if __name__ == "__main__":
    main()
