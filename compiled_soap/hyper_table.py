"""The hyperparameters of every param group as device tensors (`stacked.Hyper`), kept in step with param_groups.

Owned by the optimizer shell. A group is validated again and the table rewritten (one host-to-device copy) only
when one of its values changed, so a scheduler costs one small copy and never a recompile; a tensor lr is copied
device-to-device at every step, never read on the host.
"""

from __future__ import annotations

import torch

from .compilation import mark_static
from .hyperparameters import HYPERPARAMETERS, validate_hyperparameters
from .stacked import Hyper

# Every hyperparameter is re-validated when it changes (structural options included: a bad value is refused even
# though it only applies to parameters initialised later).
_WATCHED = tuple(h.name for h in HYPERPARAMETERS)


class HyperTable:
    def __init__(self, groups: list, defaults: dict, device: torch.device):
        self._defaults = defaults
        self._table = torch.zeros(len(Hyper._fields), len(groups), dtype=torch.float64, device=device)
        self.hyper = Hyper(*self._table.unbind(0))
        mark_static([self._table, *self.hyper])  # read-only inputs: static, so a CUDA graph never copies them in
        self._seen = [None] * len(groups)

    def update(self, groups: list) -> None:
        changed = False
        for gi, g in enumerate(groups):
            # id() for a tensor lr: comparing tensors would read them.
            seen = tuple(id(g[k]) if isinstance(g[k], torch.Tensor) else g[k] for k in _WATCHED)
            if seen != self._seen[gi]:
                validate_hyperparameters({**self._defaults, **{k: v for k, v in g.items() if k != "params"}})
                self._seen[gi] = seen
                changed = True
        if changed:
            rows = [(0.0 if isinstance(g["lr"], torch.Tensor) else float(g["lr"]), float(g["betas"][0]),
                     float(g["betas"][1]), float(g["eps"]), float(g["weight_decay"]), float(g["correct_bias"]),
                     float(g["normalize_grads"])) for g in groups]
            copy_from_host(self._table, torch.tensor(rows, dtype=torch.float64).T.contiguous())
        for gi, g in enumerate(groups):
            if isinstance(g["lr"], torch.Tensor):
                self.hyper.lr[gi].copy_(g["lr"].reshape(()), non_blocking=True)


def copy_from_host(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Host -> device without blocking the host: through pinned memory, which the caching host allocator keeps
    alive until the copy has run."""
    if dst.is_cuda:
        dst.copy_(src.pin_memory(), non_blocking=True)
    else:
        dst.copy_(src)
