"""Checkpoint layout shared by `SOAP` and `CompiledSOAP` (docs/spec.md §9), and torch.optim's state_dict hooks.

`state_dict()` is torch.optim's layout: "param_groups" as in torch.optim, "state" keyed by each parameter's index over
the param groups, plus a top-level "format_version" (FORMAT_VERSION = 2). Saved per parameter (`saved_entry`):
    step                    int, real updates done (the bias-correction t; 0 after the initialisation call)
    exp_avg                 first moment, parameter shape, in the eigenbasis (spec §2)
    exp_avg_sq              second moment, parameter shape, in the eigenbasis
    GG                      list over (merged) axes: factor [d, d], or [] for an axis without one
    Q                       list over (merged) axes: eigenbasis [d, d], or []
    precondition_frequency  int, frozen at the first step
    shampoo_beta            float, frozen at the first step
    skipped                 int, calls skipped for a non-finite gradient (spec §8)
    refresh_clock           int, the refresh clock (spec §8)
A parameter whose every gradient so far was non-finite is saved as {"skipped": n}. An absent factor is written as [],
exactly as the paper's soap.py writes it, so the paper's optimizer can load these checkpoints and continue (it ignores
the two counters). In memory both classes use None for an absent factor. Factors and eigenbases keep their memory
layout when saved (see `_saved_matrix`), which is what makes a resume bit-identical.

`factors_as_dicts` (a state_dict post hook) writes GG and Q as {axis: matrix} instead, absent factors left out: the
form torch.distributed.checkpoint can flatten. Every version is also read with GG and Q in that form.

`check_and_convert` reads versions 0 (no "format_version": this package before versioning, or the paper's own
soap.py; [] for absent factors, no skipped, no refresh_clock), 1 (None for absent factors, no refresh_clock) and 2
(the layout above, refresh_clock required); a missing skipped is 0 and, in versions 0 and 1, the refresh clock is
taken as step (spec §8). The factor of a zero-length axis is empty in whatever form it was written (the paper writes
a 0x0 GG and [] for its Q). A hyperparameter missing from a saved param group keeps the optimizer's current value
(the paper's optimizer keeps data_format outside its groups). Everything is checked before anything is changed, so
a rejected checkpoint leaves the optimizer as it was.

`state_dict_with_hooks` / `load_state_dict_with_hooks` fire the hooks registered with torch.optim.Optimizer's
register_(load_)state_dict_(pre|post)_hook exactly as torch.optim.Optimizer.(load_)state_dict does, around a
class's own way of building or loading the state.
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import Any, Callable

import torch

from .hyperparameters import validate_hyperparameters
from .validation import state_dtype

FORMAT_VERSION = 2
_TENSOR_KEYS = ("exp_avg", "exp_avg_sq")
_REQUIRED_KEYS = ("step", "exp_avg", "exp_avg_sq", "GG", "Q", "precondition_frequency", "shampoo_beta")


def _fail(msg: str) -> None:
    raise ValueError(f"cannot load SOAP state_dict: {msg}")


# ------------------------------------------------------------------------------------------------------ saving


def _saved_moment(t: torch.Tensor) -> torch.Tensor:
    # Contiguous: the in-memory moment may be a strided view of a larger (stacked) tensor.
    return t.detach().clone(memory_format=torch.contiguous_format)


def _saved_matrix(m: torch.Tensor) -> torch.Tensor:
    # A copy of its own, in the same memory layout: eigh and QR return column-major matrices, and the matmuls of the
    # following steps round differently on a row-major copy, so keeping the layout is what makes a resumed run (ours,
    # or the paper's optimizer loading this checkpoint) continue bit for bit. A non-dense view is copied contiguous.
    return m.detach().clone()


def _absent(m: Any) -> bool:
    """None in memory, [] in the saved layout: an entry written into optimizer.state by a wrapper that loads
    checkpoints itself (ZeroRedundancyOptimizer) is in the saved layout."""
    return m is None or (isinstance(m, list) and not m)


def saved_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """One parameter's in-memory state (None for an absent factor; counters as ints or 0-dim tensors) in its saved
    form: ints and floats, tensors cloned (moments contiguous, factors and bases in their layout), [] for an absent
    factor. An entry without "Q" (a parameter that was never initialised) keeps only its skip count."""
    if "Q" not in entry:
        return {"skipped": int(entry.get("skipped", 0))}
    return {
        "step": int(entry["step"]),
        "exp_avg": _saved_moment(entry["exp_avg"]),
        "exp_avg_sq": _saved_moment(entry["exp_avg_sq"]),
        "GG": [[] if _absent(m) else _saved_matrix(m) for m in entry["GG"]],
        "Q": [[] if _absent(m) else _saved_matrix(m) for m in entry["Q"]],
        "precondition_frequency": int(entry["precondition_frequency"]),
        "shampoo_beta": float(entry["shampoo_beta"]),
        "skipped": int(entry["skipped"]),
        "refresh_clock": int(entry["refresh_clock"]),
    }


def merge_state_dicts(shards: list) -> dict:
    """One state_dict from the `state_dict()`s of all the ranks of a sharded CompiledSOAP (each holds its own
    parameters' entries): loads at any world size, or in one process."""
    if not shards:
        raise ValueError("merge_state_dicts: no state_dicts given")
    state = {}
    for shard in shards:
        extra = extra_state(shard["state"], shard["param_groups"])
        for pid, entry in shard["state"].items():
            if pid in extra:  # no parameter's: every shard has it
                state.setdefault(pid, entry)
                continue
            if pid in state and "Q" in state[pid]:
                if "Q" in entry:
                    raise ValueError(f"merge_state_dicts: parameter {pid!r} has state in two shards")
                continue
            state[pid] = entry
    merged = {k: v for k, v in shards[0].items() if k != "shard"}
    return {**merged, "state": dict(sorted(state.items(), key=lambda kv: (type(kv[0]).__name__, kv[0])))}


# ------------------------------------------------------------------------------------------------------ hooks


def state_dict_with_hooks(optimizer: torch.optim.Optimizer, build: Callable[[], dict]) -> dict:
    """`build()`'s state_dict, with the optimizer's state_dict hooks fired as torch.optim fires them: every pre hook
    with the optimizer first; then every post hook with (optimizer, state_dict), a non-None result replacing it."""
    for pre_hook in optimizer._optimizer_state_dict_pre_hooks.values():
        pre_hook(optimizer)
    state_dict = build()
    for post_hook in optimizer._optimizer_state_dict_post_hooks.values():
        result = post_hook(optimizer, state_dict)
        if result is not None:
            state_dict = result
    return state_dict


def load_state_dict_with_hooks(optimizer: torch.optim.Optimizer, state_dict: dict,
                               load: Callable[[dict], None]) -> None:
    """`load(state_dict)` with the optimizer's load_state_dict hooks fired as torch.optim fires them: each pre hook
    gets (optimizer, a shallow copy of state_dict) and a non-None result replaces it; the post hooks get the optimizer
    once loading is done (not when it raised)."""
    state_dict = state_dict.copy()  # shallow, as torch.optim does: a hook may edit its top level freely
    for pre_hook in optimizer._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(optimizer, state_dict)
        if result is not None:
            state_dict = result
    load(state_dict)
    for post_hook in optimizer._optimizer_load_state_dict_post_hooks.values():
        post_hook(optimizer)


# ------------------------------------------------------------------------------------------------------ loading


def _version(state_dict: Any) -> int:
    if not isinstance(state_dict, dict):
        _fail(f"expected a dict, got {type(state_dict).__name__}")
    version = state_dict.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= FORMAT_VERSION:
        _fail(f"format_version {version!r} is not supported (this build reads 0..{FORMAT_VERSION})")
    if not isinstance(state_dict.get("state"), dict) or not isinstance(state_dict.get("param_groups"), (list, tuple)):
        _fail("it needs the keys 'state' (a dict) and 'param_groups' (a list)")
    return version


def _count(pid: Any, key: str, value: Any, minimum: int = 0) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        _fail(f"parameter {pid!r}: {key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _factor(pid: Any, key: str, m: Any, version: int, size: Any, p: torch.Tensor, sdtype: torch.dtype):
    """One saved factor entry -> None (absent) or a square tensor of side `size` on p's device."""
    absent = m is None if version == 1 else (isinstance(m, list) and len(m) == 0)
    if size == 0:
        # A zero-length axis: its factor is empty whichever way it was written (the paper writes a 0x0 GG and []
        # for its Q), so any empty form is accepted.
        if absent or (isinstance(m, torch.Tensor) and m.shape == (0, 0)):
            return torch.zeros(0, 0, dtype=sdtype, device=p.device)
        _fail(f"parameter {pid!r}: {key} of a zero-length axis must be empty, got {getattr(m, 'shape', m)!r}")
    if absent:
        if size is not None:
            _fail(f"parameter {pid!r} of shape {tuple(p.shape)}: {key} has no factor where one of size {size} is "
                  "expected")
        return None
    if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.shape[0] != m.shape[1]:
        what = repr(m) if m is None or isinstance(m, list) else f"{type(m).__name__} {tuple(getattr(m, 'shape', ()))}"
        _fail(f"parameter {pid!r}: {key} entries must be square matrices or the version-{version} mark of an absent "
              f"factor ({'None' if version == 1 else '[]'}), got {what}")
    if m.shape[0] != size:
        _fail(f"parameter {pid!r} of shape {tuple(p.shape)}: {key} has a factor of size {m.shape[0]} where "
              f"{'none' if size is None else size} is expected")
    if m.dtype != sdtype:
        _fail(f"parameter {pid!r}: {key} has dtype {m.dtype}, a {p.dtype} parameter keeps {sdtype}")
    return m.detach().to(device=p.device, copy=True)


def _as_list(pid: Any, key: str, value: Any, n_axes: int, version: int) -> Any:
    """GG or Q in the dict form of `factors_as_dicts` ({axis: matrix}, axes without a factor left out; keys as ints or
    as the strings torch.distributed.checkpoint's unflattening gives back) -> the list form of `version`."""
    if not isinstance(value, dict):
        return value
    try:
        axes = {int(a): m for a, m in value.items()}
    except (TypeError, ValueError):
        _fail(f"parameter {pid!r}: {key} as a dict must be keyed by axis numbers, got keys {sorted(map(str, value))}")
    if any(not 0 <= a < n_axes for a in axes):
        _fail(f"parameter {pid!r}: {key} names axes {sorted(axes)}, the parameter has {n_axes} (merged) axes")
    absent = None if version == 1 else []
    return [axes.get(a, absent) for a in range(n_axes)]


def factors_as_dicts(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """A state_dict post hook: GG and Q as {axis: matrix} with absent factors left out, instead of lists.

    The layout torch.distributed.checkpoint can flatten (get_optimizer_state_dict with
    flatten_optimizer_state_dict=True rejects lists). Both classes load it as they load the list form, so no
    load-side hook is needed: `optimizer.register_state_dict_post_hook(factors_as_dicts)`."""
    state = {}
    for pid, entry in state_dict["state"].items():
        if "Q" in entry:
            entry = {**entry, **{key: {str(a): m for a, m in enumerate(entry[key]) if not _absent(m)}
                                 for key in ("GG", "Q")}}
        state[pid] = entry
    return {**state_dict, "state": state}


def _entry(pid: Any, saved: Any, version: int, p: torch.Tensor, group: dict, factor_sizes) -> dict[str, Any]:
    if not isinstance(saved, dict):
        _fail(f"parameter {pid!r}: its state must be a dict, got {type(saved).__name__}")
    missing = [k for k in _REQUIRED_KEYS if k not in saved]
    if missing:
        if set(saved) <= {"skipped"}:  # a parameter that only ever had non-finite gradients
            return {"skipped": _count(pid, "skipped", saved.get("skipped", 0))}
        _fail(f"parameter {pid!r}: missing keys {missing}")
    sdtype = state_dtype(p.dtype)
    s: dict[str, Any] = {"step": _count(pid, "step", saved["step"])}
    for key in _TENSOR_KEYS:
        t = saved[key]
        if not isinstance(t, torch.Tensor) or t.shape != p.shape:
            _fail(f"parameter {pid!r}: {key} has shape {getattr(t, 'shape', None)}, the parameter {tuple(p.shape)}")
        if t.dtype != sdtype:
            _fail(f"parameter {pid!r}: {key} has dtype {t.dtype}, a {p.dtype} parameter keeps {sdtype} state")
        s[key] = t.detach().to(device=p.device, copy=True)
    expected = list(factor_sizes(p, group))
    saved = {**saved, "GG": _as_list(pid, "GG", saved["GG"], len(expected), version),
             "Q": _as_list(pid, "Q", saved["Q"], len(expected), version)}
    if not isinstance(saved["GG"], list) or not isinstance(saved["Q"], list) or len(saved["GG"]) != len(saved["Q"]):
        _fail(f"parameter {pid!r}: GG and Q must be lists of equal length")
    if len(saved["GG"]) != len(expected):
        _fail(f"parameter {pid!r} of shape {tuple(p.shape)}: {len(saved['GG'])} factor entries, expected "
              f"{len(expected)} (factor sizes {expected})")
    for key in ("GG", "Q"):
        s[key] = [_factor(pid, key, m, version, size, p, sdtype) for m, size in zip(saved[key], expected)]
    s["precondition_frequency"] = _count(pid, "precondition_frequency", saved["precondition_frequency"], minimum=1)
    sb = saved["shampoo_beta"]
    if not isinstance(sb, numbers.Real) or isinstance(sb, bool) or not math.isfinite(sb) or not 0 <= sb < 1:
        _fail(f"parameter {pid!r}: shampoo_beta must be a number in [0, 1), got {sb!r}")
    s["shampoo_beta"] = float(sb)
    s["skipped"] = _count(pid, "skipped", saved.get("skipped", 0))
    # A saved clock is used whatever the version: a wrapper (torch.distributed.checkpoint's state-dict helpers) may
    # drop the top-level format_version, and no older layout ever wrote the key.
    if version >= 2 or "refresh_clock" in saved:
        if "refresh_clock" not in saved:
            _fail(f"parameter {pid!r}: missing key 'refresh_clock' (format_version {version})")
        s["refresh_clock"] = _count(pid, "refresh_clock", saved["refresh_clock"])
        if s["refresh_clock"] < s["step"]:
            # The clock counts every call with a gradient after the initialisation call, the step only the finite ones.
            _fail(f"parameter {pid!r}: refresh_clock {s['refresh_clock']} is below step {s['step']}")
    else:
        s["refresh_clock"] = s["step"]  # spec §8: without skipped calls the clock equals the step
    return s


def _is_index(key: Any) -> bool:
    return isinstance(key, numbers.Integral) and not isinstance(key, bool)


def extra_state(state: dict, saved_groups: Any = None) -> dict:
    """The entries of a "state" that belong to no parameter, as they are: torch.optim keeps any key there (state_dict
    hooks write flags such as state["test"] = 1) and carries it through state_dict() and load_state_dict().

    In `optimizer.state` (saved_groups None) the parameters are the tensor keys. In a saved "state" they are the
    entries its param groups list (indices, or the FQNs torch.distributed.checkpoint writes); an integer key that no
    group lists is a parameter missing from the groups (an error of `check_and_convert`), not extra state."""
    if saved_groups is None:
        return {k: v for k, v in state.items() if not isinstance(k, torch.Tensor)}
    listed = {pid for g in saved_groups for pid in g["params"]}
    return {k: v for k, v in state.items() if k not in listed and not _is_index(k)}


def check_and_convert(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any], factor_sizes):
    """Validate `state_dict` against the optimizer's parameters; return (param_groups, {param: state}).

    `factor_sizes(param, group)` gives the factor size per (merged) axis, None where an axis has no factor.

    The returned param groups are the saved ones (deep copies) holding the optimizer's parameters; a hyperparameter
    missing from a saved group (the paper's soap.py keeps data_format outside its groups) keeps the current group's
    value. The returned states are in memory form: None for an absent factor, ints for the counters, "refresh_clock"
    always present; their tensors are copies on the parameters' devices in each parameter's state dtype (fp32, or fp64
    for fp64 parameters). Nothing of the optimizer is touched.
    """
    version = _version(state_dict)
    groups, saved_groups = optimizer.param_groups, state_dict["param_groups"]
    if len(groups) != len(saved_groups):
        _fail(f"it has {len(saved_groups)} param groups, the optimizer has {len(groups)}")
    id_to_param: dict[Any, torch.Tensor] = {}
    group_of: dict[Any, dict] = {}
    new_groups = []
    for gi, (g, sg) in enumerate(zip(groups, saved_groups)):
        if not isinstance(sg, dict) or not isinstance(sg.get("params"), (list, tuple)):
            _fail(f"param group {gi} must be a dict with a list 'params'")
        if len(g["params"]) != len(sg["params"]):
            _fail(f"param group {gi} has {len(sg['params'])} parameters in the checkpoint, {len(g['params'])} here")
        id_to_param.update(zip(sg["params"], g["params"]))
        merged = {**{k: v for k, v in g.items() if k != "params"},
                  **copy.deepcopy({k: v for k, v in sg.items() if k != "params"})}
        try:
            validate_hyperparameters(merged)
        except ValueError as e:
            _fail(f"param group {gi}: {e}")
        group_of.update((pid, merged) for pid in sg["params"])
        new_groups.append({**merged, "params": g["params"]})

    new_state: dict[torch.Tensor, dict[str, Any]] = {}
    for pid, saved in state_dict["state"].items():
        if pid not in id_to_param and not _is_index(pid):
            continue  # no parameter's: `extra_state` carries it
        if pid not in id_to_param:
            _fail(f"state for parameter id {pid!r}, which is in no param group")
        new_state[id_to_param[pid]] = _entry(pid, saved, version, id_to_param[pid], group_of[pid], factor_sizes)
    return new_groups, new_state
