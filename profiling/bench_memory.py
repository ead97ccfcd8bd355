"""Memory held by a training process, side by side: parameters + gradients + optimizer, counted as distinct memory.

    python -m profiling.bench_memory --preset tiny --preset gpt2-l4-d256

For each optimizer, on the same parameters (presets.py) and a real backward (loss = sum(p * g), so each .grad is a
fixed synthetic gradient made fresh by autograd), after a few steps:
  * held_after_backward: bytes of the union of the memory ranges of every parameter, every .grad and every tensor
    reachable from the optimizer object, right after backward();
  * held_after_zero_grad: the same after zero_grad() (set_to_none=True);
  * optimizer_bytes: the part of that memory that is neither a parameter's nor a gradient's (what the optimizer
    adds), and its ratio to the reference SOAP's (which holds exactly the paper's state);
  * copies: CompiledSOAP's `last_step_copies` (gradients and parameters a step copied in).
Storages are counted by address range, so views of one buffer count once and a parameter living inside a bucket
is not counted twice. Peers (pytorch-optimizer's and heavyball's SOAP) get rows when installed; their
hyperparameters are mapped to the paper's (betas (0.95, 0.95), shampoo_beta = beta2, f = 10, max_precond_dim
10000, no merging, no 1-D preconditioning).
"""

from __future__ import annotations

import argparse
import gc
import sys

import torch

from compiled_soap import SOAP, CompiledSOAP

from .presets import PRESETS, make_grads, make_params

PAPER = dict(lr=3e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.01, precondition_frequency=10)


def _peers() -> dict:
    out = {}
    try:
        import pytorch_optimizer

        out["pytorch-optimizer"] = lambda ps: pytorch_optimizer.SOAP(
            ps, shampoo_beta=0.95, max_precondition_dim=10000, merge_dims=False, precondition_1d=False, **PAPER)
    except ImportError:
        pass
    try:
        import heavyball

        out["heavyball"] = lambda ps: heavyball.SOAP(
            ps, shampoo_beta=0.95, max_precond_dim=10000, merge_dims=False, precondition_1d=False, **PAPER)
    except ImportError:
        pass
    return out


def optimizers() -> dict:
    return {"soap-reference": lambda ps: SOAP(ps, **PAPER), **_peers(),
            "compiled-soap": lambda ps: CompiledSOAP(ps, compile=False, **PAPER),
            "compiled-soap (storage=separate)": lambda ps: CompiledSOAP(ps, compile=False, storage="separate",
                                                                         **PAPER)}


def reachable_tensors(root, limit: int = 200_000) -> list:
    """Every tensor reachable from `root` through attributes, containers and NamedTuples (not through modules'
    code, functions or classes)."""
    seen, out, stack = set(), [], [root]
    while stack and len(seen) < limit:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            out.append(x)
            if x.grad is not None:
                stack.append(x.grad)
            continue
        if isinstance(x, (str, bytes, int, float, bool, type(None), type, torch.dtype, torch.device)) or callable(x) \
                and not hasattr(x, "__dict__"):
            continue
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)
        elif hasattr(x, "__dict__") and not isinstance(x, type) and not callable(x):
            stack.extend(vars(x).values())
    return out


def union_bytes(tensors) -> int:
    ranges = sorted({(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in tensors
                     if t.untyped_storage().nbytes()})
    total, end = 0, 0
    for start, n in ranges:
        lo, hi = max(start, end), start + n
        if hi > lo:
            total += hi - lo
        end = max(end, hi)
    return total


def measure(preset, name: str, build, steps: int = 3) -> dict:
    params = make_params(preset, torch.device("cpu"))
    grads = make_grads(preset, torch.device("cpu"))
    opt = build(params)

    def backward():
        sum((p * g).sum() for p, g in zip(params, grads)).backward()

    for _ in range(steps):
        backward()
        opt.step()
        opt.zero_grad()
    backward()
    own = params + [p.grad for p in params if p.grad is not None]
    everything = own + reachable_tensors(opt)
    after_backward = union_bytes(everything)
    optimizer_bytes = after_backward - union_bytes(own)
    opt.step()
    opt.zero_grad()
    after_zero = union_bytes(params + [p.grad for p in params if p.grad is not None] + reachable_tensors(opt))
    copies = getattr(opt, "last_step_copies", None)
    del opt
    gc.collect()
    return {"preset": preset.name, "optimizer": name, "held_after_backward": after_backward,
            "held_after_zero_grad": after_zero, "optimizer_bytes": optimizer_bytes, "copies": copies}


def table(rows: list) -> str:
    ref = {r["preset"]: r for r in rows if r["optimizer"] == "soap-reference"}
    lines = [f"{'preset':<14} {'optimizer':<34} {'held after backward':>20} {'x ref':>7} "
             f"{'after zero_grad':>16} {'optimizer bytes':>16} {'x ref':>7}  copies in the last step"]
    for r in rows:
        base = ref[r["preset"]]
        lines.append(f"{r['preset']:<14} {r['optimizer']:<34} {r['held_after_backward']:>20,} "
                     f"{r['held_after_backward'] / base['held_after_backward']:>7.3f} "
                     f"{r['held_after_zero_grad']:>16,} {r['optimizer_bytes']:>16,} "
                     f"{r['optimizer_bytes'] / base['optimizer_bytes']:>7.3f}  {r['copies'] or '-'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m profiling.bench_memory", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", action="append", choices=sorted(PRESETS), help="repeatable (default: tiny)")
    args = ap.parse_args(argv)
    rows = [measure(PRESETS[p], name, build) for p in (args.preset or ["tiny"])
            for name, build in optimizers().items()]
    print(f"torch {torch.__version__}, CPU; bytes; x ref = ratio to soap-reference (the paper's state)")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
