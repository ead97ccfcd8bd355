"""Hyperparameter and input checks shared by `SOAP` and `CompiledSOAP`.

This is argument checking, not math: sharing it keeps the two classes' error messages identical without coupling
their numerics.
"""

from __future__ import annotations

import math
from typing import Any

import torch

DATA_FORMATS = ("channels_first", "channels_last")

DEFAULTS: dict[str, Any] = {
    "lr": 3e-3,
    "betas": (0.95, 0.95),
    "shampoo_beta": -1,
    "eps": 1e-8,
    "weight_decay": 0.01,
    "precondition_frequency": 10,
    "max_precond_dim": 10000,
    "merge_dims": False,
    "precondition_1d": False,
    "normalize_grads": False,
    "data_format": "channels_first",
    "correct_bias": True,
}


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_hyperparameters(group: dict[str, Any]) -> None:
    """Raise ValueError naming the first bad hyperparameter in a param group (or the defaults)."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Invalid lr: a tensor lr must have one element, got shape {tuple(lr.shape)}")
        lr = lr.item()
    if not _is_real(lr) or lr < 0:
        raise ValueError(f"Invalid lr: {group['lr']!r} (must be a finite number >= 0)")
    eps = group["eps"]
    if not _is_real(eps) or eps <= 0:
        # eps = 0 is legal in torch.optim.Adam, but here any exactly-zero projected gradient component (an unused
        # embedding row, an all-zero gradient) would be 0/0 = NaN and poison the parameter: refuse it.
        raise ValueError(f"Invalid eps: {eps!r} (must be a finite number > 0)")
    wd = group["weight_decay"]
    if not _is_real(wd) or wd < 0:
        raise ValueError(f"Invalid weight_decay: {wd!r} (must be a finite number >= 0)")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
    for i, b in enumerate(betas):
        if not _is_real(b) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid betas: beta{i + 1}={b!r} in {tuple(betas)!r} (each must be in [0, 1))")
    sb = group["shampoo_beta"]
    if not _is_real(sb) or sb >= 1.0:
        raise ValueError(f"Invalid shampoo_beta: {sb!r} (must be < 1; a negative value means betas[1])")
    f = group["precondition_frequency"]
    if not isinstance(f, int) or isinstance(f, bool) or f < 1:
        raise ValueError(f"Invalid precondition_frequency: {f!r} (must be an integer >= 1)")
    mpd = group["max_precond_dim"]
    if not isinstance(mpd, int) or isinstance(mpd, bool) or mpd < 1:
        raise ValueError(f"Invalid max_precond_dim: {mpd!r} (must be an integer >= 1)")
    fmt = group["data_format"]
    if fmt not in DATA_FORMATS:
        raise ValueError(f"Invalid data_format: {fmt!r} (must be one of {DATA_FORMATS})")
    for flag in ("merge_dims", "precondition_1d", "normalize_grads", "correct_bias"):
        if not isinstance(group[flag], bool):
            raise ValueError(f"Invalid {flag}: {group[flag]!r} (must be a bool)")


def validate_param(p: torch.Tensor) -> None:
    """Reject parameters SOAP cannot optimise, before any state exists."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"SOAP optimises tensors; got {type(p).__name__}")
    if p.is_complex():
        raise ValueError(f"SOAP does not support complex parameters (got dtype {p.dtype})")
    if not p.is_floating_point():
        raise ValueError(f"SOAP needs floating-point parameters (got dtype {p.dtype})")
    if p.is_sparse:
        raise ValueError("SOAP does not support sparse parameters")


def checked_defaults(arguments: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters among a constructor's arguments (its locals()), validated."""
    defaults = {k: arguments[k] for k in DEFAULTS}
    validate_hyperparameters(defaults)
    return defaults


def validate_param_group(group: dict, defaults: dict) -> None:
    """Check a param group before it is added; its "params" become a list (a generator, e.g. model.parameters(),
    would otherwise be consumed by the check)."""
    params = group["params"]
    group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
    for p in group["params"]:
        validate_param(p)
    validate_hyperparameters({**defaults, **{k: v for k, v in group.items() if k != "params"}})


def validate_grad(p: torch.Tensor) -> None:
    """Checked at every step for parameters that have a gradient."""
    g = p.grad
    if g.is_sparse:
        raise RuntimeError("SOAP does not support sparse gradients; use a dense gradient (e.g. sparse=False in nn.Embedding)")
    if g.is_complex():
        raise RuntimeError(f"SOAP does not support complex gradients (got dtype {g.dtype})")
    if g.shape != p.shape:
        raise RuntimeError(f"gradient shape {tuple(g.shape)} does not match parameter shape {tuple(p.shape)}")


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Spec §6.2: fp32 state for 16- and 32-bit parameters, fp64 for fp64 parameters."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32
