"""Scale estimate for CompiledSOAP's sharded distributed mode, from the cost model (docs/design.md §4, flop_model.py).

    python -m profiling.scale_estimate [--world-sizes 1,2,4,8] [--bus-gbps 400] [--tflops 400] ...

Nothing is run on a device: every number is arithmetic on the parameter shapes of a GPT-2-style model (by default
about 1.1 billion parameters), all of one dtype (fp32 or bf16: the owners, and so every element count, are the same;
bytes are elements times 4 or 2). What is modelled, after compiled_soap/sharding.py:

* Ownership. Every parameter is an item with one owner among the W ranks; the owner keeps all of its SOAP state and
  runs its whole step (plain and refresh). The owners are the planner's own: compiled_soap.ownership.assign_owners on
  the weights compiled_soap.ownership.item_flops gives (the amortized FLOPs of the compiled step, plus 20 FLOPs per
  element for the elementwise Adam arithmetic), classes keyed by (shape, dtype, weight), for replicated parameters and
  FSDP2 alike. The param group is CompiledSOAP's defaults (merge_dims and precondition_1d off) except for the flags.
* FLOPs per item, plain and refresh: flop_model.py's compiled ("batched") variant, 3 units per plain step, 5 units plus
  F·Q (2s³) and a Householder QR forming Q ((8/3)s³) per factor at a refresh, plus the same elementwise term. Their
  mean over a refresh period is the planner's weight.
* State per item: compiled_soap.ownership.state_bytes (fp32 moments at parameter shape, a factor and an eigenbasis per
  factored axis; fp32 for bf16 parameters too). Counters are ignored.
* Communication, per rank per step, with one collective per dtype and direction (one dtype here):
    - replicated parameters (DDP): after the step ONE all_gather over a flat buffer. Each rank packs the parameters it
      owns contiguously, padded to width = the most elements any rank owns; every rank receives W·width (its own
      slot included). A rank sends width and receives (W-1)·width; in the NCCL bus-bandwidth convention the time is
      (W-1)·width / bus bandwidth. The only padding left is W·width - P: ranks balanced on FLOPs own unequal numbers
      of elements.
    - FSDP2 (DTensor parameters sharded on dim 0 like torch.chunk: ceil(d0/W) rows per rank, the last ranks short or
      empty): before the step ONE all_to_all_single with exact split sizes, no padding: rank r sends every other
      owner o its rows of o's parameters and of their gradients (2 · its shard); after the step ONE
      all_to_all_single: each owner sends every other rank that rank's rows of its updated parameters. What a rank
      keeps for itself does not cross the wire. The owners of much data receive more than they send, so the time of
      each all_to_all is taken as the largest amount any rank sends or receives / bus bandwidth.
  For comparison, what the wrappers move themselves per step, per rank on the wire: DDP's ring all-reduce of the
  gradients 2·(W-1)/W·P; FSDP2's all-gather of the parameters in forward and in backward plus the reduce-scatter of
  the gradients, 3·(W-1)·ceil(d0/W) rows per item (FSDP2 pads its own collectives).
* A refresh moves nothing extra: the state never leaves its owner. The saving is measured against replicated DDP
  today, where every rank runs the whole optimizer step; a rank's step time is set by the most loaded rank.
* Time: bytes on the wire per rank / bus bandwidth, and FLOPs / effective FLOP rate. Both rates are assumptions
  (flags); collective latency and the overlap of communication with compute are not modelled.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from compiled_soap.ownership import ELEMENTWISE_FLOPS, assign_owners, item_flops, state_bytes
from profiling import flop_model as fm
from profiling.presets import PRESETS, Preset

VARIANT = "batched"  # the compiled step: 3 units per plain step, 5 units + M·Q and QR terms per refresh
BYTES = {"fp32": 4, "bf16": 2}
DTYPE = torch.float32  # the planner's class key; owners do not depend on it when the whole model has one dtype


GPT_1B = PRESETS["gpt-1b"]  # the model shapes come from profiling/presets.py only


def numel(shape) -> int:
    return math.prod(shape)


def planner_group(period: int = 10, max_precond_dim: int = 10000) -> dict:
    """The structural options item_flops and state_bytes read: CompiledSOAP's defaults but for the two flags."""
    return {"max_precond_dim": max_precond_dim, "merge_dims": False, "precondition_1d": False,
            "data_format": "channels_first", "precondition_frequency": period}


def dim0_rows(d0: int, world: int, rank: int) -> int:
    """Rows of a dim-0 shard on `rank`, split as torch.chunk splits (FSDP2's Shard(0)): ceil(d0/W) per rank, the
    last ranks short or empty."""
    per = -(-d0 // world)
    return min(per, max(0, d0 - rank * per))


def shard_numel(shape, world: int, rank: int) -> int:
    shape = tuple(shape)
    d0 = shape[0] if shape else 1
    return dim0_rows(d0, world, rank) * numel(shape[1:])


@dataclass(frozen=True)
class Item:
    name: str
    shape: tuple[int, ...]
    plain: float  # FLOPs of a plain step, with the elementwise term
    refresh: float  # of a refresh step
    cost: float  # the planner's weight (compiled_soap.ownership.item_flops): amortized FLOPs
    state: int  # bytes of SOAP state

    @property
    def numel(self) -> int:
        return numel(self.shape)


def make_items(shapes, period: int = 10, max_precond_dim: int = 10000) -> list[Item]:
    """Items from a list of shapes or of (name, shape)."""
    group = planner_group(period, max_precond_dim)
    out = []
    for k, s in enumerate(shapes):
        name, shape = (s[0], tuple(s[1])) if isinstance(s[0], str) else (f"p{k}", tuple(s))
        extra = ELEMENTWISE_FLOPS * numel(shape)
        out.append(Item(name, shape,
                        fm.step_flops([shape], VARIANT, "plain", max_precond_dim=max_precond_dim) + extra,
                        fm.step_flops([shape], VARIANT, "refresh", max_precond_dim=max_precond_dim) + extra,
                        item_flops(shape, group), state_bytes(shape, DTYPE, group)))
    return out


def owners_of(items: list[Item], world: int) -> list[int]:
    """The planner's assignment (compiled_soap.ownership.assign_owners), classes keyed as the optimizer keys them."""
    return assign_owners([it.cost for it in items], [(it.shape, DTYPE, it.cost) for it in items], world)


@dataclass(frozen=True)
class Estimate:
    world: int
    params: int
    owners: tuple[int, ...]
    rank_elems: tuple[int, ...]  # parameter elements each rank owns
    rank_state: tuple[int, ...]  # bytes
    rank_plain: tuple[float, ...]  # FLOPs
    rank_refresh: tuple[float, ...]
    rank_loads: tuple[float, ...]  # amortized FLOPs, the planner's balance
    state_total: int
    state_bound: int  # total/W + largest item's state
    plain_total: float
    refresh_total: float
    amortized_total: float
    amortized_bound: float  # total/W + the costliest item
    collectives_ddp: int  # per step (one dtype)
    collectives_fsdp: int
    gather_width: int  # elements: the flat all_gather's slot per rank
    pre_sent: tuple[int, ...]  # FSDP2, elements each rank sends to / receives from the others
    pre_recv: tuple[int, ...]
    post_sent: tuple[int, ...]
    post_recv: tuple[int, ...]
    ddp_allreduce_elems: float  # DDP's own gradient all-reduce, per rank on the wire
    fsdp_own_elems: int  # FSDP2's own all-gathers (forward, backward) and reduce-scatter, per rank

    state_rank_max = property(lambda self: max(self.rank_state))
    plain_rank_max = property(lambda self: max(self.rank_plain))
    refresh_rank_max = property(lambda self: max(self.rank_refresh))
    amortized_rank_max = property(lambda self: max(self.rank_loads))

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

    @property
    def gather_sent(self) -> int:
        """Elements a rank contributes to the all_gather (its padded slot)."""
        return self.gather_width if self.world > 1 else 0

    @property
    def gather_recv(self) -> int:
        """Elements a rank receives from the others; also its time basis in the bus-bandwidth convention."""
        return (self.world - 1) * self.gather_width

    @property
    def gather_unpadded(self) -> float:
        return self.params * (self.world - 1) / self.world

    @property
    def gather_padding(self) -> int:
        """Zeros in the all_gather's output: W·width - P."""
        return self.world * self.gather_width - self.params if self.world > 1 else 0

    @property
    def fsdp_pre(self) -> int:
        """Time basis of the all_to_all before the step: the most any rank sends or receives."""
        return max(self.pre_sent + self.pre_recv)

    @property
    def fsdp_post(self) -> int:
        return max(self.post_sent + self.post_recv)

    @property
    def fsdp_elems(self) -> int:
        return self.fsdp_pre + self.fsdp_post

    @property
    def fsdp_balanced(self) -> float:
        """3·P·(W-1)/W², what every rank would send and receive if all owned equal data."""
        return 3 * self.params * (self.world - 1) / self.world ** 2


def estimate(items: list[Item], world: int) -> Estimate:
    owners = owners_of(items, world)
    ranks = range(world)

    def per_rank(f):
        return tuple(sum(f(it) for it, o in zip(items, owners) if o == r) for r in ranks)

    rank_elems = per_rank(lambda it: it.numel)
    shard = [[shard_numel(it.shape, world, r) for r in ranks] for it in items]
    # Rank r sends owner o != r its rows of o's items (parameter and gradient); the owner receives everyone else's.
    pre_sent = tuple(2 * sum(shard[i][r] for i, o in enumerate(owners) if o != r) for r in ranks)
    pre_recv = tuple(2 * sum(it.numel - shard[i][r] for i, (it, o) in enumerate(zip(items, owners)) if o == r)
                     for r in ranks)
    post_sent = tuple(x // 2 for x in pre_recv)
    post_recv = tuple(x // 2 for x in pre_sent)
    params = sum(it.numel for it in items)
    amortized_total = sum(it.cost for it in items)
    state_total = sum(it.state for it in items)
    own = sum(3 * (world - 1) * shard[i][0] for i in range(len(items)))  # shard[i][0] = ceil(d0/W) rows
    return Estimate(
        world=world, params=params, owners=tuple(owners), rank_elems=rank_elems,
        rank_state=per_rank(lambda it: it.state), rank_plain=per_rank(lambda it: it.plain),
        rank_refresh=per_rank(lambda it: it.refresh), rank_loads=per_rank(lambda it: it.cost),
        state_total=state_total,
        state_bound=state_total // world + max(it.state for it in items),
        plain_total=sum(it.plain for it in items),
        refresh_total=sum(it.refresh for it in items),
        amortized_total=amortized_total,
        amortized_bound=amortized_total / world + max(it.cost for it in items),
        collectives_ddp=1 if world > 1 else 0,  # one per dtype; none on a single rank
        collectives_fsdp=2 if world > 1 else 0,
        gather_width=max(rank_elems),
        pre_sent=pre_sent, pre_recv=pre_recv, post_sent=post_sent, post_recv=post_recv,
        ddp_allreduce_elems=2 * (world - 1) / world * params,
        fsdp_own_elems=own,
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


def report(cfg: Preset, worlds: list[int], detail_world: int, period: int, max_precond_dim: int,
           bus_gbps: float, tflops: float) -> str:
    shapes = cfg.shapes()
    items = make_items(shapes, period, max_precond_dim)
    ests = {w: estimate(items, w) for w in sorted(set(worlds) | {detail_world})}
    e1 = ests.get(1) or estimate(items, 1)
    bw, rate = bus_gbps * 1e9, tflops * 1e12
    fp32, bf16 = BYTES["fp32"], BYTES["bf16"]
    classes: dict = {}
    for it in items:
        classes.setdefault(it.shape, []).append(it)
    out = []
    out.append(f"Model: {cfg.describe()}.")
    n_qr = fm.n_factors([s for _, s in shapes], max_precond_dim=max_precond_dim)
    out.append(f"Parameters: {e1.params:,} in {len(shapes)} tensors, {len(classes)} classes of identical shape; "
               f"{n_qr} factors (QR calls per refresh).")
    out.append(f"Assumptions: compiled variant (cost model of docs/design.md §4, Householder QR forming Q "
               f"{fm.QR_FLOPS_PER_S3:.3g}·s³, plus {ELEMENTWISE_FLOPS} FLOPs per element for the elementwise Adam "
               f"arithmetic); owners from compiled_soap.ownership.assign_owners; precondition_frequency {period}; "
               f"max_precond_dim {max_precond_dim}; state fp32; one parameter dtype (fp32 or bf16); bus bandwidth "
               f"{bus_gbps:g} GB/s per rank (NCCL bus-bandwidth convention: time = bytes a rank puts on, or takes "
               f"off, the wire / bandwidth); {tflops:g} TFLOP/s effective for the optimizer's matmuls and QR; no "
               f"latency, no overlap. GB = 1e9 bytes, TFLOP = 1e12 FLOPs.")
    out.append("")
    out.append("Classes (item shape x count: factors, FLOPs per item plain / refresh / amortized, state per item):")
    for shape, members in classes.items():
        c = members[0]
        sizes = fm.factor_sizes(shape, max_precond_dim=max_precond_dim)
        fac = "x".join(str(s) if s else "-" for s in sizes)
        out.append(f"  {str(shape):>14} x {len(members):3d}: factors {fac:>11}, {_tf(c.plain):>6} / "
                   f"{_tf(c.refresh):>6} / {_tf(c.cost):>6} TFLOP, {_gb(c.state):>5} GB")
    out.append("")

    out.append("State and optimizer FLOPs per rank (the most loaded rank of the planner's assignment; W=1 is "
               "replicated):")
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

    out.append("Communication per rank per step, replicated parameters (DDP): one flat all_gather; GB; a refresh adds "
               "nothing:")
    rows = []
    for w, e in ests.items():
        rows.append([str(w), str(e.collectives_ddp), f"{e.gather_width / 1e6:.1f}",
                     _gb(fp32 * e.gather_sent), _gb(fp32 * e.gather_recv), _gb(bf16 * e.gather_sent),
                     _gb(bf16 * e.gather_recv), _gb(fp32 * e.gather_unpadded),
                     f"{100 * e.gather_padding / e.params:.1f}%",
                     _gb(fp32 * e.ddp_allreduce_elems), _gb(bf16 * e.ddp_allreduce_elems)])
    out.append(_table(["W", "collectives", "width M elements", "sent fp32", "received fp32", "sent bf16",
                       "received bf16", "unpadded P(W-1)/W fp32", "padding (W·width-P)/P",
                       "DDP's own all-reduce fp32", "bf16"], rows))
    out.append("")
    out.append("Communication per rank per step, FSDP2 (dim-0 shards): two all_to_all_single with exact splits; GB, "
               "the most any rank sends / receives; a refresh adds nothing:")
    rows = []
    for w, e in ests.items():
        rows.append([str(w), str(e.collectives_fsdp),
                     f"{_gb(fp32 * max(e.pre_sent))} / {_gb(fp32 * max(e.pre_recv))}",
                     f"{_gb(fp32 * max(e.post_sent))} / {_gb(fp32 * max(e.post_recv))}",
                     _gb(fp32 * e.fsdp_elems), _gb(bf16 * e.fsdp_elems), _gb(fp32 * e.fsdp_balanced),
                     _gb(fp32 * e.fsdp_own_elems), _gb(bf16 * e.fsdp_own_elems)])
    out.append(_table(["W", "collectives", "before fp32 sent / received", "after fp32 sent / received",
                       "sharded total fp32", "bf16", "balanced 3P(W-1)/W² fp32", "FSDP2's own fp32", "bf16"], rows))
    out.append("")

    out.append(f"Time per rank per step, ms ({bus_gbps:g} GB/s, {tflops:g} TFLOP/s): optimizer compute saved by the "
               f"sharding vs communication it adds (the wrappers' own communication in parentheses):")
    rows = []
    for w, e in ests.items():
        rows.append([str(w), _ms(e.plain_saved / rate), _ms(e.refresh_saved / rate), _ms(e.amortized_saved / rate),
                     _ms(fp32 * e.gather_recv / bw), _ms(bf16 * e.gather_recv / bw),
                     f"({_ms(fp32 * e.ddp_allreduce_elems / bw)})",
                     _ms(fp32 * e.fsdp_elems / bw), _ms(bf16 * e.fsdp_elems / bw),
                     f"({_ms(fp32 * e.fsdp_own_elems / bw)})"])
    out.append(_table(["W", "saved: plain step", "refresh step", f"amortized over {period}",
                       "added: DDP-sharded fp32", "bf16", "(DDP all-reduce fp32)",
                       "added: FSDP2-sharded fp32", "bf16", "(FSDP2 own fp32)"], rows))
    out.append("")

    e, w = ests[detail_world], detail_world
    out.append(f"Per rank for W = {detail_world} (amortized / plain / refresh TFLOP per step, state GB, owned "
               f"M elements, FSDP2 GB fp32 sent / received before and after the step):")
    rows = []
    for r in range(w):
        kinds: dict = {}
        for it, o in zip(items, e.owners):
            if o == r and len(it.shape) > 1:
                kind = it.name.split(".", 1)[1] if it.name.startswith("h") and "." in it.name else it.name
                kinds[kind] = kinds.get(kind, 0) + 1
        rows.append([str(r), _tf(e.rank_loads[r]), _tf(e.rank_plain[r]), _tf(e.rank_refresh[r]),
                     _gb(e.rank_state[r]), f"{e.rank_elems[r] / 1e6:.1f}",
                     f"{_gb(fp32 * e.pre_sent[r])} / {_gb(fp32 * e.pre_recv[r])}",
                     f"{_gb(fp32 * e.post_sent[r])} / {_gb(fp32 * e.post_recv[r])}",
                     ", ".join(f"{n} {k}" for k, n in kinds.items())])
    out.append(_table(["rank", "amortized", "plain", "refresh", "state", "elements", "before", "after",
                       "matrices owned"], rows))
    out.append(f"  max {_tf(e.amortized_rank_max)}, total/W {_tf(e.amortized_total / w)}, bound total/W + "
               f"costliest item {_tf(e.amortized_bound)}: "
               f"{'within' if e.amortized_rank_max <= e.amortized_bound else 'ABOVE'} the bound; "
               f"imbalance max/(total/W) = {e.amortized_rank_max / (e.amortized_total / w):.3f}")
    if w > 1:
        out.append(f"  all_gather width {e.gather_width / 1e6:.1f} M elements against P/W = "
                   f"{e.params / w / 1e6:.1f} M: padding {e.gather_padding / 1e6:.1f} M elements in W·width "
                   f"({100 * e.gather_padding / e.params:.1f}% of P)")
    if e.plain_saved > 0:
        saved_s = e.plain_saved / rate
        out.append(f"Break-even on a plain step for W = {detail_world} (fp32): the added communication costs as "
                   f"much as the compute saved at {fp32 * e.gather_recv / saved_s / 1e9:.0f} GB/s (DDP-sharded) or "
                   f"{fp32 * e.fsdp_elems / saved_s / 1e9:.0f} GB/s (FSDP2-sharded) at {tflops:g} TFLOP/s; or at "
                   f"{e.plain_saved / (fp32 * e.gather_recv / bw) / 1e12:.0f} TFLOP/s (DDP-sharded) or "
                   f"{e.plain_saved / (fp32 * e.fsdp_elems / bw) / 1e12:.0f} TFLOP/s (FSDP2-sharded) "
                   f"at {bus_gbps:g} GB/s.")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world-sizes", default="1,2,4,8", help="comma-separated W for the tables")
    ap.add_argument("--world", type=int, default=8, help="W of the per-rank detail")
    ap.add_argument("--bus-gbps", type=float, default=400.0, help="assumed bus bandwidth per rank, GB/s")
    ap.add_argument("--tflops", type=float, default=400.0, help="assumed effective optimizer FLOP rate, TFLOP/s")
    ap.add_argument("--precondition-frequency", type=int, default=10)
    ap.add_argument("--max-precond-dim", type=int, default=10000)
    ap.add_argument("--preset", default=GPT_1B.name, choices=sorted(PRESETS), help="model shapes (profiling/presets.py)")
    a = ap.parse_args(argv)
    cfg = PRESETS[a.preset]
    worlds = [int(w) for w in a.world_sizes.split(",") if w.strip()]
    print(report(cfg, worlds, a.world, a.precondition_frequency, a.max_precond_dim, a.bus_gbps, a.tflops))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
