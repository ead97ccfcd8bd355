"""SOAP's hyperparameters, defined once: name, default, check and meaning.

Both constructors (`SOAP`, `CompiledSOAP`) take exactly these arguments with exactly these defaults (docs/spec.md §1);
the README's table is generated from `HYPERPARAMETERS` by `markdown_table()`, and tests keep the signatures and the
table in step with it.

Values are accepted wherever torch.optim accepts them: Python numbers, numpy scalars (`np.float32(3e-3)`,
`np.int64(10)`), and for lr a one-element tensor. Integer options take integers only (not floats such as 10.0, not
bools); every number must be finite.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from .validation import split_names, validate_param

DATA_FORMATS = ("channels_first", "channels_last")


class Hyperparameter(NamedTuple):
    name: str
    default: Any
    check: Callable[[Any], None]  # raises ValueError naming the hyperparameter when the value is not allowed
    doc: str


def _is_bool(x: Any) -> bool:
    return isinstance(x, (bool, np.bool_))


def _is_real(x: Any) -> bool:
    """A finite real number (Python or numpy), not a bool."""
    return isinstance(x, numbers.Real) and not _is_bool(x) and math.isfinite(x)


def _is_integer(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not _is_bool(x)


def _check_lr(lr: Any) -> None:
    value = lr
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:  # torch.optim's wording
            raise ValueError(f"Tensor lr must be 1-element (got shape {tuple(lr.shape)})")
        value = lr.item()
    if not _is_real(value) or value < 0:
        raise ValueError(f"Invalid learning rate: {lr!r} (lr must be a finite number >= 0)")


def _check_betas(betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
    for i, b in enumerate(betas):
        if not _is_real(b) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b!r} (betas={tuple(betas)!r}; each must be in "
                             "[0, 1))")


def _check_shampoo_beta(sb: Any) -> None:
    if not _is_real(sb) or sb >= 1.0:
        raise ValueError(f"Invalid shampoo_beta: {sb!r} (must be < 1; a negative value means betas[1])")


def _check_eps(eps: Any) -> None:
    if not _is_real(eps) or eps <= 0:
        # eps = 0 is legal in torch.optim.Adam, but here any exactly-zero projected gradient component (an unused
        # embedding row, an all-zero gradient) would be 0/0 = NaN and poison the parameter: refuse it.
        raise ValueError(f"Invalid epsilon value: {eps!r} (eps must be a finite number > 0)")


def _check_weight_decay(wd: Any) -> None:
    if not _is_real(wd) or wd < 0:
        raise ValueError(f"Invalid weight_decay value: {wd!r} (must be a finite number >= 0)")


def _check_positive_integer(name: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if not _is_integer(value) or value < 1:
            raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= 1)")

    return check


def _check_flag(name: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if not _is_bool(value):
            raise ValueError(f"Invalid {name}: {value!r} (must be a bool)")

    return check


def _check_data_format(fmt: Any) -> None:
    if not isinstance(fmt, str) or fmt not in DATA_FORMATS:
        raise ValueError(f"Invalid data_format: {fmt!r} (must be one of {DATA_FORMATS})")


HYPERPARAMETERS: tuple[Hyperparameter, ...] = (
    Hyperparameter("lr", 3e-3, _check_lr,
                   "step size; read from the param group at every step, so schedulers work"),
    Hyperparameter("betas", (0.95, 0.95), _check_betas,
                   "(beta1, beta2) of the Adam moments kept in the eigenbasis; each in [0, 1)"),
    Hyperparameter("shampoo_beta", -1, _check_shampoo_beta,
                   "EMA factor of the Kronecker factors, < 1; negative means betas[1]. "
                   "Frozen per parameter at its first step"),
    Hyperparameter("eps", 1e-8, _check_eps,
                   "added to sqrt(V), > 0 (HF convention: not bias-corrected)"),
    Hyperparameter("weight_decay", 0.01, _check_weight_decay,
                   "decoupled weight decay, applied after the update with the plain lr, only when > 0"),
    Hyperparameter("precondition_frequency", 10, _check_positive_integer("precondition_frequency"),
                   "eigenbasis refresh period f, on the parameter's refresh clock (docs/spec.md §8). "
                   "Frozen per parameter at its first step"),
    Hyperparameter("max_precond_dim", 10000, _check_positive_integer("max_precond_dim"),
                   "an axis longer than this gets no factor (identity along it)"),
    Hyperparameter("merge_dims", False, _check_flag("merge_dims"),
                   "greedily merge adjacent axes up to max_precond_dim before factoring"),
    Hyperparameter("precondition_1d", False, _check_flag("precondition_1d"),
                   "give 1-D parameters an n×n factor (otherwise they get plain Adam)"),
    Hyperparameter("normalize_grads", False, _check_flag("normalize_grads"),
                   "rescale each update to unit RMS"),
    Hyperparameter("data_format", "channels_first", _check_data_format,
                   '"channels_last": 4-D NHWC tensors are permuted to NCHW before merging (only with merge_dims)'),
    Hyperparameter("correct_bias", True, _check_flag("correct_bias"),
                   "fold Adam's bias correction into the step size"),
)

DEFAULTS: dict[str, Any] = {h.name: h.default for h in HYPERPARAMETERS}


def validate_hyperparameters(group: dict[str, Any]) -> None:
    """Raise ValueError naming the first bad hyperparameter (in constructor order) of a param group or defaults."""
    for h in HYPERPARAMETERS:
        h.check(group[h.name])


def checked_defaults(arguments: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters among a constructor's arguments (its locals()), validated."""
    defaults = {h.name: arguments[h.name] for h in HYPERPARAMETERS}
    validate_hyperparameters(defaults)
    return defaults


def validate_param_group(group: dict, defaults: dict) -> None:
    """Check a param group before it is added.

    Its "params" become a list (a generator, e.g. model.parameters(), would otherwise be consumed by the check), and
    named parameters ((name, tensor) pairs) are split as torch.optim splits them (`split_names`). The same tensor
    listed twice is an error: torch.optim only warns, and SOAP would step it twice with one state.
    """
    params = group["params"]
    if isinstance(params, set):  # torch.optim's check, which would come too late: the set is a list by then
        raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering of "
                        "tensors in sets will change between runs. Please use a list instead.")
    group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
    split_names(group)
    first_position: dict[int, int] = {}
    for j, p in enumerate(group["params"]):
        validate_param(p)
        i = first_position.setdefault(id(p), j)
        if i != j:
            raise ValueError(f"parameter at positions {i} and {j} of a param group is the same tensor (torch.optim "
                             "only warns; SOAP would step it twice with one state): list each parameter once")
    validate_hyperparameters({**defaults, **{k: v for k, v in group.items() if k != "params"}})


def markdown_table() -> str:
    """The README's table of hyperparameters: one row per entry of HYPERPARAMETERS, in constructor order."""
    rows = ["| name | default | meaning |", "|---|---|---|"]
    for h in HYPERPARAMETERS:
        rows.append(f"| `{h.name}` | `{h.default!r}` | {h.doc} |")
    return "\n".join(rows) + "\n"
