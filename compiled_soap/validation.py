"""Input checks shared by `SOAP` and `CompiledSOAP`: parameters, gradients, and the state dtype.

This is argument checking, not math: sharing it keeps the two classes' error messages identical without coupling
their numerics. The hyperparameter checks live in `hyperparameters`, where the hyperparameters are defined.
"""

from __future__ import annotations

import torch

__all__ = ["validate_param", "validate_grad", "state_dtype", "split_names"]


def is_dtensor(t) -> bool:
    """A torch.distributed DTensor (FSDP2's parameters and gradients)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(t, DTensor)


def split_names(group: dict) -> None:
    """Named parameters, as torch.optim takes them (`model.named_parameters()`: (name, tensor) pairs): the tensors
    stay in "params" and the names go to the group's "param_names", with torch.optim's error when only some
    parameters are named. A group without names is left as it is."""
    items = group["params"]
    names = [item[0] for item in items if isinstance(item, tuple)]
    if not names:
        return
    if len(names) != len(items):
        raise ValueError("all optimizer params should be with/without names. Some param names are missing")
    group["params"] = [item[1] for item in items]
    group["param_names"] = names


def validate_param(p: torch.Tensor) -> None:
    """Reject parameters SOAP cannot optimise, before any state exists."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"optimizer can only optimize Tensors, but one of the params is {torch.typename(p)}")
    if p.is_complex():
        raise ValueError(f"SOAP does not support complex parameters (got dtype {p.dtype})")
    if not p.is_floating_point():
        raise ValueError(f"SOAP needs floating-point parameters (got dtype {p.dtype})")
    if p.is_sparse:
        raise ValueError("SOAP does not support sparse parameters")


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
