"""Checkpoint layout shared by `SOAP` and `CompiledSOAP`: torch.optim's per-parameter state_dict.

Per parameter (keyed by its index over param_groups, as in torch.optim):
    step                    int, real updates done (0 after the initialisation call)
    exp_avg                 first moment, parameter shape, in the eigenbasis (spec §2)
    exp_avg_sq              second moment, parameter shape, in the eigenbasis
    GG                      list over (merged) axes: factor [d, d], or None for an axis without one
    Q                       list over (merged) axes: eigenbasis [d, d], or None
    precondition_frequency  int, frozen at the first step
    shampoo_beta            float, frozen at the first step
    skipped                 int, steps skipped for a non-finite gradient
plus a top-level "format_version". Both classes write and read exactly this, so a checkpoint of one loads into the
other. Loading checks everything first and changes nothing when it raises.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from .validation import state_dtype, validate_hyperparameters

FORMAT_VERSION = 1
_TENSOR_KEYS = ("exp_avg", "exp_avg_sq")
_REQUIRED_KEYS = ("step", "exp_avg", "exp_avg_sq", "GG", "Q", "precondition_frequency", "shampoo_beta")


def _fail(msg: str) -> None:
    raise ValueError(f"cannot load SOAP state_dict: {msg}")


def migrate(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Bring an older checkpoint to FORMAT_VERSION, or reject it.

    Version 0 is a checkpoint without the field (this package before versioning, or the paper's own soap.py): the
    same keys, with [] where a factor is absent and no "skipped" counter.
    """
    version = state_dict.get("format_version", 0)
    if not isinstance(version, int) or version < 0 or version > FORMAT_VERSION:
        _fail(f"format_version {version!r} is not supported (this build reads 0..{FORMAT_VERSION})")
    if "state" not in state_dict or "param_groups" not in state_dict:
        _fail("it needs the keys 'state' and 'param_groups'")
    if version == FORMAT_VERSION:
        return state_dict
    state = {}
    for k, s in state_dict["state"].items():
        s = dict(s)
        for key in ("GG", "Q"):
            if isinstance(s.get(key), list):
                s[key] = [None if isinstance(m, list) or (isinstance(m, torch.Tensor) and m.numel() == 0) else m
                          for m in s[key]]
        s.setdefault("skipped", 0)
        state[k] = s
    return {**state_dict, "state": state, "format_version": FORMAT_VERSION}


def check_and_convert(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any], factor_sizes):
    """Validate `state_dict` against the optimizer's parameters; return (param_groups, {param: state}).

    `factor_sizes(param, group)` gives the factor size per (merged) axis, None where an axis has no factor.

    Nothing of the optimizer is touched; the returned tensors are copies on the parameters' devices in the state
    dtype of each parameter (fp32, or fp64 for fp64 parameters).
    """
    state_dict = migrate(state_dict)
    groups, saved_groups = optimizer.param_groups, state_dict["param_groups"]
    if len(groups) != len(saved_groups):
        _fail(f"it has {len(saved_groups)} param groups, the optimizer has {len(groups)}")
    id_to_param: dict[Any, torch.Tensor] = {}
    sg_of: dict[Any, dict] = {}
    for gi, (g, sg) in enumerate(zip(groups, saved_groups)):
        if len(g["params"]) != len(sg["params"]):
            _fail(f"param group {gi} has {len(sg['params'])} parameters in the checkpoint, {len(g['params'])} here")
        id_to_param.update(zip(sg["params"], g["params"]))
        hyper = {**optimizer.defaults, **{k: v for k, v in sg.items() if k != "params"}}
        try:
            validate_hyperparameters(hyper)
        except ValueError as e:
            _fail(f"param group {gi}: {e}")
        sg_of.update((pid, hyper) for pid in sg["params"])

    new_state: dict[torch.Tensor, dict[str, Any]] = {}
    for pid, saved in state_dict["state"].items():
        if pid not in id_to_param:
            _fail(f"state for parameter id {pid!r}, which is in no param group")
        p = id_to_param[pid]
        missing = [k for k in _REQUIRED_KEYS if k not in saved]
        if missing:
            if set(saved) <= {"skipped"}:  # a parameter that only ever had non-finite gradients
                new_state[p] = {"skipped": int(saved.get("skipped", 0))}
                continue
            _fail(f"parameter {pid!r}: missing keys {missing}")
        sdtype = state_dtype(p.dtype)
        s: dict[str, Any] = {}
        for key in _TENSOR_KEYS:
            t = saved[key]
            if not isinstance(t, torch.Tensor) or t.shape != p.shape:
                _fail(f"parameter {pid!r}: {key} has shape {getattr(t, 'shape', None)}, the parameter {tuple(p.shape)}")
            if t.dtype != sdtype:
                _fail(f"parameter {pid!r}: {key} has dtype {t.dtype}, a {p.dtype} parameter keeps {sdtype} state")
            s[key] = t.detach().to(device=p.device, copy=True)
        if not isinstance(saved["GG"], list) or not isinstance(saved["Q"], list) or len(saved["GG"]) != len(saved["Q"]):
            _fail(f"parameter {pid!r}: GG and Q must be lists of equal length")
        expected = factor_sizes(p, sg_of[pid])
        found = [None if f is None else f.shape[0] for f in saved["GG"]]
        if found != expected:
            _fail(f"parameter {pid!r} of shape {tuple(p.shape)}: factor sizes {found}, expected {expected}")
        for key in ("GG", "Q"):
            mats = []
            for f, q in zip(saved["GG"], saved["Q"]):
                if (f is None) != (q is None):
                    _fail(f"parameter {pid!r}: GG and Q disagree on which axes have factors")
                m = f if key == "GG" else q
                if m is not None:
                    if not isinstance(m, torch.Tensor) or m.dim() != 2 or m.shape[0] != m.shape[1]:
                        _fail(f"parameter {pid!r}: {key} entries must be square matrices")
                    if m.dtype != sdtype:
                        _fail(f"parameter {pid!r}: {key} has dtype {m.dtype}, a {p.dtype} parameter keeps {sdtype}")
                    m = m.detach().to(device=p.device, copy=True)
                mats.append(m)
            s[key] = mats
        s["step"] = int(saved["step"])
        s["precondition_frequency"] = int(saved["precondition_frequency"])
        s["shampoo_beta"] = float(saved["shampoo_beta"])
        s["skipped"] = int(saved.get("skipped", 0))
        new_state[p] = s

    new_groups = []
    for g, sg in zip(groups, saved_groups):
        ng = copy.deepcopy({k: v for k, v in sg.items() if k != "params"})
        ng["params"] = g["params"]
        new_groups.append(ng)
    return new_groups, new_state
