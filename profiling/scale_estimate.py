"""Scale estimate for CompiledSOAP's sharded distributed mode, from the cost model (docs/design.md §4, flop_model.py).

    python -m profiling.scale_estimate [--world-sizes 1,2,4,8] [--bus-gbps 400] [--tflops 400] ...

Nothing is run on a device: every number is arithmetic on the parameter shapes of a GPT-2-style model (by default
about 1.1 billion parameters). What is modelled:

* Items and classes. Every parameter is an item; items of the same shape (one dtype is assumed for the whole model)
  form a class, and every collective is issued once per class.
* Ownership. Each item is owned by one of the W ranks; the owner keeps all of its SOAP state and runs its whole step
  (plain and refresh). The assignment is greedy on the amortized FLOPs of an item (batched/compiled variant,
  ((f-1)·plain + refresh)/f): classes in decreasing item cost, floor(n/W) items of a class to every rank, then the n
  mod W remaining items one at a time to the least-loaded rank (ties: the lowest rank). The cost model counts matmuls
  and QR only; like the planner in compiled_soap/sharding.py, every count here adds 20 FLOPs per element for the
  elementwise Adam arithmetic, so that items without a factor weigh something (--elementwise-flops).
* State. Per item, fp32: exp_avg and exp_avg_sq (parameter shape), and per factored axis of size s a factor and an
  eigenbasis (2·s² elements). Counters are ignored.
* Communication, per class with n items of N elements and m = the most items of that class owned by one rank (the
  stacked buffers are padded to m items per rank):
    - replicated parameters (DDP): one all_gather_into_tensor of the updated parameters. Each rank contributes m·N
      elements; on the wire (ring / NCCL bus-bandwidth convention) each rank sends and receives (W-1)·m·N.
    - FSDP2 (parameters sharded on dim 0; a shard has ceil(d0/W) rows, as FSDP2 pads): before the step one
      all_to_all_single brings each owner the shards of its items' parameter and gradient, 2·(W-1)·m·shard elements
      sent per rank; after the step one all_to_all_single returns the updated shards, (W-1)·m·shard per rank.
  For comparison, what the wrappers move themselves per step, per rank on the wire: DDP's ring all-reduce of the
  gradients 2·(W-1)/W·P; FSDP2's all-gather of the parameters in forward and in backward plus the reduce-scatter of
  the gradients, 3·(W-1)·shard per item.
  A class with fewer than W items still costs (W-1)·N per rank in the padded all-gather (m = 1); the table also gives
  the traffic if such classes were broadcast from their owners instead (about N elements per rank per item).
* A refresh moves nothing extra: the state never leaves its owner. The saving is measured against replicated DDP
  today, where every rank runs the whole optimizer step; a rank's step time is set by the most loaded rank.
* Time: bytes on the wire per rank / bus bandwidth, and FLOPs / effective FLOP rate. Both rates are assumptions
  (flags); collective latency and the overlap of communication with compute are not modelled.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from profiling import flop_model as fm

VARIANT = "batched"  # the compiled step: 3 units per plain step, 5 units + QR terms per refresh
STATE_BYTES = 4  # SOAP keeps its state in fp32 for fp32 and bf16 parameters (docs/spec.md)
# Per element and step, the elementwise Adam arithmetic the cost model leaves out. The sharding planner
# (compiled_soap/sharding.py) adds this much per element to an item's weight so that unfactored items weigh something;
# it is added here to every FLOP count (0.02 TFLOP per step on the 1B model) so that the assignment is the planner's.
ELEMENTWISE_FLOPS = 20


@dataclass(frozen=True)
class GPTConfig:
    """GPT-2 layout: token and position embeddings, per block LN, fused QKV, attention output, LN, MLP; final LN;
    LM head tied to the token embedding (no parameter of its own). Weights are (out, in)."""

    layers: int
    d_model: int
    d_mlp: int
    vocab: int
    ctx: int

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        d, h = self.d_model, self.d_mlp
        out = [("wte", (self.vocab, d)), ("wpe", (self.ctx, d))]
        for i in range(self.layers):
            p = f"h{i}."
            out += [
                (p + "ln_1.weight", (d,)), (p + "ln_1.bias", (d,)),
                (p + "attn.qkv.weight", (3 * d, d)), (p + "attn.qkv.bias", (3 * d,)),
                (p + "attn.proj.weight", (d, d)), (p + "attn.proj.bias", (d,)),
                (p + "ln_2.weight", (d,)), (p + "ln_2.bias", (d,)),
                (p + "mlp.fc.weight", (h, d)), (p + "mlp.fc.bias", (h,)),
                (p + "mlp.proj.weight", (d, h)), (p + "mlp.proj.bias", (d,)),
            ]
        out += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
        return out

    def describe(self) -> str:
        return (f"GPT-2-style, {self.layers} layers, d_model {self.d_model}, MLP {self.d_mlp}, vocab {self.vocab}, "
                f"context {self.ctx}, LM head tied to the token embedding")


GPT_1B = GPTConfig(layers=20, d_model=2048, d_mlp=8192, vocab=50257, ctx=2048)


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def state_elements(shape, max_precond_dim: int = 10000) -> int:
    """exp_avg + exp_avg_sq + (factor + eigenbasis) per factored axis."""
    sizes = fm.factor_sizes(shape, max_precond_dim=max_precond_dim)
    return 2 * numel(shape) + sum(2 * s * s for s in sizes if s)


def item_flops(shape, max_precond_dim: int = 10000,
               elementwise_flops: float = ELEMENTWISE_FLOPS) -> tuple[float, float]:
    """(plain step, refresh step) FLOPs of one item, compiled variant, plus the elementwise term."""
    kw = {"max_precond_dim": max_precond_dim}
    extra = elementwise_flops * numel(shape)
    return (fm.step_flops([shape], VARIANT, "plain", **kw) + extra,
            fm.step_flops([shape], VARIANT, "refresh", **kw) + extra)


def dim0_shard_numel(shape, world: int) -> int:
    """Elements of one FSDP2 dim-0 shard, padded: ceil(d0/W) rows."""
    return math.ceil(shape[0] / world) * (numel(shape) // shape[0])


@dataclass(frozen=True)
class ItemClass:
    shape: tuple[int, ...]
    count: int
    plain: float  # FLOPs per item
    refresh: float
    cost: float  # amortized FLOPs per item, the balancing weight
    state: int  # state elements per item


def item_classes(shapes, period: int = 10, max_precond_dim: int = 10000,
                 elementwise_flops: float = ELEMENTWISE_FLOPS) -> list[ItemClass]:
    """Group the shapes (a list of shapes, or of (name, shape)) into classes of identical items, in order of first
    appearance."""
    counts: dict[tuple[int, ...], int] = {}
    for s in shapes:
        shape = tuple(s[1] if isinstance(s[0], str) else s)
        counts[shape] = counts.get(shape, 0) + 1
    out = []
    for shape, n in counts.items():
        plain, refresh = item_flops(shape, max_precond_dim, elementwise_flops)
        out.append(ItemClass(shape, n, plain, refresh, fm.amortized(plain, refresh, period),
                             state_elements(shape, max_precond_dim)))
    return out


def greedy_assign(costs, counts, world: int) -> tuple[list[list[int]], list[float]]:
    """Greedy ownership of the items of classes with per-item cost costs[c] and counts[c] items.

    Returns (per class, how many of its items each rank owns; each rank's total cost). Classes are taken in decreasing
    item cost (ties: the class listed first); each rank gets floor(n/W) of a class, the rest go one by one to the
    least-loaded rank (ties: the lowest rank)."""
    loads = [0.0] * world
    owned = [[0] * world for _ in costs]
    for c in sorted(range(len(costs)), key=lambda c: -costs[c]):
        base, rest = divmod(counts[c], world)
        for r in range(world):
            owned[c][r] = base
            loads[r] += base * costs[c]
        for _ in range(rest):
            r = min(range(world), key=lambda r: (loads[r], r))
            owned[c][r] += 1
            loads[r] += costs[c]
    return owned, loads


@dataclass(frozen=True)
class Estimate:
    world: int
    params: int
    state_total: int  # bytes
    state_rank_max: int
    state_bound: int  # total/W + largest item's state
    plain_total: float  # FLOPs
    plain_rank_max: float
    refresh_total: float
    refresh_rank_max: float
    amortized_total: float
    amortized_rank_max: float
    amortized_bound: float  # total/W + the costliest item
    collectives_ddp: int  # per step
    collectives_fsdp: int
    ddp_gather_elems: int  # per rank, on the wire, per step
    ddp_broadcast_small_elems: int  # the same, if classes of fewer than W items were broadcast from their owners
    fsdp_pre_elems: int
    fsdp_post_elems: int
    ddp_allreduce_elems: float  # DDP's own gradient all-reduce, per rank on the wire
    fsdp_own_elems: int  # FSDP2's own all-gathers (forward, backward) and reduce-scatter
    rank_loads: tuple[float, ...]

    @property
    def fsdp_elems(self) -> int:
        return self.fsdp_pre_elems + self.fsdp_post_elems

    @property
    def plain_saved(self) -> float:
        """FLOPs the most loaded rank no longer runs per plain step, against every rank running everything."""
        return self.plain_total - self.plain_rank_max

    @property
    def refresh_saved(self) -> float:
        return self.refresh_total - self.refresh_rank_max

    @property
    def amortized_saved(self) -> float:
        return self.amortized_total - self.amortized_rank_max


def estimate(classes: list[ItemClass], world: int) -> Estimate:
    owned, loads = greedy_assign([c.cost for c in classes], [c.count for c in classes], world)
    per_rank = lambda attr: [sum(getattr(c, attr) * owned[i][r] for i, c in enumerate(classes)) for r in range(world)]
    state_rank = per_rank("state")
    params = sum(numel(c.shape) * c.count for c in classes)
    state_total = sum(c.state * c.count for c in classes)
    amortized_total = sum(c.cost * c.count for c in classes)
    gather = pre = post = own = small = 0
    for i, c in enumerate(classes):
        m = max(owned[i])
        shard = dim0_shard_numel(c.shape, world)
        gather += (world - 1) * m * numel(c.shape)
        # A broadcast puts about N elements per item on each rank's wire (bus-bandwidth convention).
        small += c.count * numel(c.shape) if c.count < world else (world - 1) * m * numel(c.shape)
        pre += 2 * (world - 1) * m * shard
        post += (world - 1) * m * shard
        own += 3 * (world - 1) * shard * c.count
    n_coll = len(classes) if world > 1 else 0  # one collective per class and direction; none on a single rank
    return Estimate(
        world=world,
        params=params,
        state_total=state_total * STATE_BYTES,
        state_rank_max=max(state_rank) * STATE_BYTES,
        state_bound=(state_total // world + max(c.state for c in classes)) * STATE_BYTES,
        plain_total=sum(c.plain * c.count for c in classes),
        plain_rank_max=max(per_rank("plain")),
        refresh_total=sum(c.refresh * c.count for c in classes),
        refresh_rank_max=max(per_rank("refresh")),
        amortized_total=amortized_total,
        amortized_rank_max=max(per_rank("cost")),
        amortized_bound=amortized_total / world + max(c.cost for c in classes),
        collectives_ddp=n_coll,
        collectives_fsdp=2 * n_coll,
        ddp_gather_elems=gather,
        ddp_broadcast_small_elems=small,
        fsdp_pre_elems=pre,
        fsdp_post_elems=post,
        ddp_allreduce_elems=2 * (world - 1) / world * params,
        fsdp_own_elems=own,
        rank_loads=tuple(loads),
    )


# ---------------------------------------------------------------------------------------------------------- report


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f}"


def _tf(flops: float) -> str:
    return f"{flops / 1e12:.2f}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def report(cfg: GPTConfig, worlds: list[int], detail_world: int, period: int, max_precond_dim: int,
           bus_gbps: float, tflops: float, elementwise_flops: float = ELEMENTWISE_FLOPS) -> str:
    shapes = cfg.shapes()
    classes = item_classes(shapes, period, max_precond_dim, elementwise_flops)
    ests = {w: estimate(classes, w) for w in sorted(set(worlds) | {detail_world})}
    e1 = ests.get(1) or estimate(classes, 1)
    bw, rate = bus_gbps * 1e9, tflops * 1e12
    out = []
    out.append(f"Model: {cfg.describe()}.")
    n_qr = fm.n_factors([s for _, s in shapes], max_precond_dim=max_precond_dim)
    out.append(f"Parameters: {e1.params:,} in {len(shapes)} tensors, {len(classes)} classes of identical shape; "
               f"{n_qr} factors (QR calls per refresh).")
    out.append(f"Assumptions: compiled variant (cost model of docs/design.md §4, plus {elementwise_flops:g} FLOPs per "
               f"element for the elementwise Adam arithmetic); precondition_frequency {period}; "
               f"max_precond_dim {max_precond_dim}; "
               f"state fp32; bus bandwidth {bus_gbps:g} GB/s per rank (NCCL bus-bandwidth convention: time = bytes a "
               f"rank puts on the wire / bandwidth); {tflops:g} TFLOP/s effective for the optimizer's matmuls and "
               f"QR; no latency, no overlap. GB = 1e9 bytes, TFLOP = 1e12 FLOPs.")
    out.append("")
    out.append("Classes (item shape x count: factors, FLOPs per item plain / refresh / amortized, state per item):")
    for c in classes:
        sizes = fm.factor_sizes(c.shape, max_precond_dim=max_precond_dim)
        fac = "x".join(str(s) if s else "-" for s in sizes)
        out.append(f"  {str(c.shape):>14} x {c.count:3d}: factors {fac:>11}, {_tf(c.plain):>6} / {_tf(c.refresh):>6} / "
                   f"{_tf(c.cost):>6} TFLOP, {_gb(c.state * STATE_BYTES):>5} GB")
    out.append("")

    out.append("State and optimizer FLOPs per rank (the most loaded rank of the greedy assignment; W=1 is replicated):")
    rows = []
    for w, e in ests.items():
        rows.append([str(w), _gb(e.state_total), _gb(e.state_rank_max), _gb(e.state_bound),
                     _tf(e.plain_total), _tf(e.plain_rank_max), _tf(e.plain_saved),
                     _tf(e.refresh_total), _tf(e.refresh_rank_max), _tf(e.refresh_saved),
                     _tf(e.amortized_rank_max), _tf(e.amortized_total / w), _tf(e.amortized_bound)])
    out.append(_table(["W", "state total GB", "state/rank GB", "total/W + largest GB",
                       "plain TFLOP total", "plain/rank", "plain saved/rank",
                       "refresh TFLOP total", "refresh/rank", "refresh saved/rank",
                       "amortized/rank", "amortized total/W", "total/W + costliest"], rows))
    out.append("")

    out.append("Communication per rank per step, GB on the wire, replicated parameters (DDP); a refresh adds nothing:")
    rows = []
    for w, e in ests.items():
        rows.append([str(w), str(e.collectives_ddp), _gb(4 * e.ddp_gather_elems), _gb(2 * e.ddp_gather_elems),
                     _gb(4 * e.params * (w - 1) / w), _gb(4 * e.ddp_broadcast_small_elems),
                     _gb(4 * e.ddp_allreduce_elems), _gb(2 * e.ddp_allreduce_elems)])
    out.append(_table(["W", "collectives", "sharded all-gather fp32", "bf16", "same unpadded, fp32",
                       "fp32, classes of < W items broadcast",
                       "DDP's own all-reduce fp32", "bf16"], rows))
    out.append("")
    out.append("Communication per rank per step, GB on the wire, FSDP2 (dim-0 shards); a refresh adds nothing:")
    rows = []
    for w, e in ests.items():
        rows.append([str(w), str(e.collectives_fsdp), _gb(4 * e.fsdp_pre_elems), _gb(4 * e.fsdp_post_elems),
                     _gb(4 * e.fsdp_elems), _gb(2 * e.fsdp_elems), _gb(4 * 3 * e.params * (w - 1) / w**2),
                     _gb(4 * e.fsdp_own_elems), _gb(2 * e.fsdp_own_elems)])
    out.append(_table(["W", "collectives", "all-to-all before fp32", "after fp32", "sharded total fp32", "bf16",
                       "same unpadded, fp32", "FSDP2's own fp32", "bf16"], rows))
    out.append("")

    out.append(f"Time per rank per step, ms ({bus_gbps:g} GB/s, {tflops:g} TFLOP/s): optimizer compute saved by the "
               f"sharding vs communication it adds (the wrappers' own communication in parentheses):")
    rows = []
    for w, e in ests.items():
        rows.append([str(w), _ms(e.plain_saved / rate), _ms(e.refresh_saved / rate), _ms(e.amortized_saved / rate),
                     _ms(4 * e.ddp_gather_elems / bw), _ms(2 * e.ddp_gather_elems / bw),
                     f"({_ms(4 * e.ddp_allreduce_elems / bw)})",
                     _ms(4 * e.fsdp_elems / bw), _ms(2 * e.fsdp_elems / bw), f"({_ms(4 * e.fsdp_own_elems / bw)})"])
    out.append(_table(["W", "saved: plain step", "refresh step", f"amortized over {period}",
                       "added: DDP-sharded fp32", "bf16", "(DDP all-reduce fp32)",
                       "added: FSDP2-sharded fp32", "bf16", "(FSDP2 own fp32)"], rows))
    out.append("")

    e = ests[detail_world]
    out.append(f"Greedy assignment for W = {detail_world} (amortized TFLOP per step per rank):")
    out.append("  " + " ".join(_tf(x) for x in e.rank_loads))
    out.append(f"  max {_tf(e.amortized_rank_max)}, total/W {_tf(e.amortized_total / detail_world)}, bound total/W + "
               f"costliest item {_tf(e.amortized_bound)}: "
               f"{'within' if e.amortized_rank_max <= e.amortized_bound else 'ABOVE'} the bound; "
               f"imbalance max/(total/W) = {e.amortized_rank_max / (e.amortized_total / detail_world):.3f}")
    if e.plain_saved > 0:
        saved_s = e.plain_saved / rate
        out.append(f"Break-even on a plain step for W = {detail_world} (fp32): the added communication costs as "
                   f"much as the compute saved at {4 * e.ddp_gather_elems / saved_s / 1e9:.0f} GB/s (DDP-sharded) or "
                   f"{4 * e.fsdp_elems / saved_s / 1e9:.0f} GB/s (FSDP2-sharded) at {tflops:g} TFLOP/s; or at "
                   f"{e.plain_saved / (4 * e.ddp_gather_elems / bw) / 1e12:.0f} TFLOP/s (DDP-sharded) or "
                   f"{e.plain_saved / (4 * e.fsdp_elems / bw) / 1e12:.0f} TFLOP/s (FSDP2-sharded) "
                   f"at {bus_gbps:g} GB/s.")
    out.append(f"Padding by class for W = {detail_world} (n items, m = most owned by one rank; DDP-sharded all-gather "
               f"GB per rank, fp32, padded vs unpadded):")
    owned, _ = greedy_assign([c.cost for c in classes], [c.count for c in classes], detail_world)
    w = detail_world
    for c, o in zip(classes, owned):
        n = numel(c.shape)
        out.append(f"  {str(c.shape):>14}: n {c.count:3d}, m {max(o)}, {_gb(4 * (w - 1) * max(o) * n):>5} vs "
                   f"{_gb(4 * (w - 1) * c.count * n / w):>5}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world-sizes", default="1,2,4,8", help="comma-separated W for the tables")
    ap.add_argument("--world", type=int, default=8, help="W of the per-rank assignment detail")
    ap.add_argument("--bus-gbps", type=float, default=400.0, help="assumed bus bandwidth per rank, GB/s")
    ap.add_argument("--tflops", type=float, default=400.0, help="assumed effective optimizer FLOP rate, TFLOP/s")
    ap.add_argument("--precondition-frequency", type=int, default=10)
    ap.add_argument("--max-precond-dim", type=int, default=10000)
    ap.add_argument("--elementwise-flops", type=float, default=ELEMENTWISE_FLOPS,
                    help="FLOPs per element and step added for the elementwise Adam arithmetic")
    ap.add_argument("--layers", type=int, default=GPT_1B.layers)
    ap.add_argument("--d-model", type=int, default=GPT_1B.d_model)
    ap.add_argument("--d-mlp", type=int, default=None, help="default 4 x d-model")
    ap.add_argument("--vocab", type=int, default=GPT_1B.vocab)
    ap.add_argument("--ctx", type=int, default=GPT_1B.ctx)
    a = ap.parse_args(argv)
    cfg = GPTConfig(a.layers, a.d_model, a.d_mlp or 4 * a.d_model, a.vocab, a.ctx)
    worlds = [int(w) for w in a.world_sizes.split(",") if w.strip()]
    print(report(cfg, worlds, a.world, a.precondition_frequency, a.max_precond_dim, a.bus_gbps, a.tflops,
                 a.elementwise_flops))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
