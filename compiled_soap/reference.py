"""`SOAP`: the eager, per-parameter reference. The oracle every fast path is tested against.

It follows the SOAP paper's own code (Vyas et al. 2024, soap.py) operation by operation, so that fp32 runs agree with
it bit for bit; section numbers below refer to docs/spec.md. It deliberately shares no math with the batched fast path
(`compiled_soap.stacked`): tests between the two only mean something if the two are independent.

Departures from the paper's code (spec §6), all of which leave fp32 results unchanged:
  1. the closure runs with autograd enabled (the paper evaluates it under no_grad, so closure training fails);
  2. any float dtype works: factors, eigenbases and moments are fp32 for 16/32-bit parameters, fp64 for fp64 ones;
  3. eigh and QR run in the factor dtype (the paper always uses fp32), so fp64 runs are fp64-accurate.
Additions (spec §8, §9):
  - hyperparameters are validated at construction, in add_param_group and again at the start of every step() (so a
    bad value written into param_groups raises before anything changes); numpy scalars are accepted;
  - the same tensor listed twice in a param group is an error;
  - a call whose gradient holds NaN/Inf is skipped for that parameter: its value and state stay as they were except
    `state["skipped"]`, which counts it, and `state["refresh_clock"]`;
  - the eigenbasis refresh follows the refresh clock (the calls with a gradient after the initialisation call,
    skipped ones included) instead of the step; without skipped calls the two are equal and so is the schedule;
  - state_dict() writes the checkpoint layout of `checkpoint` (absent factors as [], as the paper's code does, so
    the paper's optimizer loads it), and load_state_dict() reads it without casting fp32 state to a 16-bit
    parameter's dtype; both fire torch.optim's state_dict hooks.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import chain
from typing import Any, Callable, Optional

import numpy as np
import torch

from .checkpoint import (FORMAT_VERSION, check_and_convert, extra_state, load_state_dict_with_hooks, saved_entry,
                         state_dict_with_hooks)
from .hyperparameters import checked_defaults, validate_hyperparameters, validate_param_group
from .validation import is_dtensor, state_dtype, validate_grad


def _number(x: Any) -> Any:
    """A numpy scalar as the Python number of the same value (so np.float32(3e-3) steps like float(np.float32(3e-3)));
    anything else (Python numbers, a tensor lr) as it is."""
    return x.item() if isinstance(x, np.generic) else x


class SOAP(torch.optim.Optimizer):
    """Reference SOAP. Same arguments and defaults as the paper's optimizer (spec §1).

    Args:
        params: parameters or param-group dicts.
        lr: step size (read from the group at every step, so schedulers work).
        betas: (beta1, beta2) of Adam run in the eigenbasis.
        shampoo_beta: EMA factor of the Kronecker factors; negative means betas[1]. Frozen per parameter at its
            first step.
        eps: added to sqrt(V) (HF convention: not bias-corrected).
        weight_decay: decoupled, applied after the update with the plain lr, only when > 0.
        precondition_frequency: eigenbasis refresh period f, on the parameter's refresh clock (spec §8); frozen per
            parameter at its first step.
        max_precond_dim: axes longer than this get no factor (identity along that axis).
        merge_dims: greedily merge adjacent axes up to max_precond_dim before factoring.
        precondition_1d: give 1-D parameters a factor (otherwise they get plain Adam).
        normalize_grads: rescale each update to unit RMS.
        data_format: "channels_last" permutes 4-D NHWC tensors to NCHW before merging (only with merge_dims).
        correct_bias: fold Adam's bias correction into the step size.
        orthogonalization: "householder" (the paper's QR) or "cholesky": the Q whose R has a positive diagonal,
            which is what CholeskyQR computes (`compiled_soap.orthogonalization.cholesky`). Column signs are all
            that differ, and SOAP's update does not see them (M is rotated with Q, V is sign-invariant).

    Structural options (merge_dims, max_precond_dim, precondition_1d, data_format) must not change after a
    parameter's first step.
    """

    def __init__(
        self,
        params,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float = -1,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        data_format: str = "channels_first",
        correct_bias: bool = True,
        *,
        orthogonalization: str = "householder",
    ):
        defaults = checked_defaults(locals())
        if orthogonalization not in ("householder", "cholesky"):
            raise ValueError(f"Invalid orthogonalization: {orthogonalization!r} (one of 'cholesky', 'householder')")
        self.orthogonalization = orthogonalization
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        validate_param_group(param_group, self.defaults)
        if any(is_dtensor(p) for p in param_group["params"]):
            # The reference is per-tensor math on whole matrices: a DTensor shard cannot be eigendecomposed alone.
            raise ValueError("SOAP (the reference) steps whole, plain tensors; for FSDP2 (DTensor) parameters use "
                             "CompiledSOAP, which gathers each parameter at its owner rank")
        super().add_param_group(param_group)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "orthogonalization": self.orthogonalization}

    def __setstate__(self, state: dict) -> None:
        state = {"orthogonalization": "householder", **state}
        had_differentiable = "differentiable" in state.get("defaults", {})
        super().__setstate__(state)
        if not had_differentiable:  # torch.optim adds it; it is no hyperparameter of SOAP's
            self.defaults.pop("differentiable", None)
        for s in self.state.values():  # pickled before the refresh clock existed: no call was skipped since init
            if isinstance(s, dict) and "Q" in s and "refresh_clock" not in s:
                s["refresh_clock"] = s["step"]

    # ------------------------------------------------------------------ checkpoints (spec §9)

    def state_dict(self) -> dict:
        return state_dict_with_hooks(self, self._build_state_dict)

    def _build_state_dict(self) -> dict:
        index: dict[int, int] = {}
        groups = []
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            packed["params"] = [index.setdefault(id(p), len(index)) for p in g["params"]]
            groups.append(packed)
        state = {}
        for g in self.param_groups:
            for p in g["params"]:
                s = self.state.get(p)
                if s and ("Q" in s or s.get("skipped", 0)):  # not the empty entries a lookup of self.state[p] makes
                    state[index[id(p)]] = saved_entry(s)
        state.update(extra_state(self.state))  # keys that are no parameter's, kept as torch.optim keeps them
        return {"state": state, "param_groups": groups, "format_version": FORMAT_VERSION}

    def load_state_dict(self, state_dict: dict) -> None:
        load_state_dict_with_hooks(self, state_dict, self._load)

    def _load(self, state_dict: dict) -> None:
        # torch.optim's loader would cast the fp32 state of a bf16 parameter down to bf16: do it ourselves.
        groups, state = check_and_convert(self, state_dict, self._factor_sizes)
        self.param_groups = groups
        self.state = defaultdict(dict, {**state, **extra_state(state_dict["state"], state_dict["param_groups"])})

    def _factor_sizes(self, p: torch.Tensor, group: dict) -> list:
        limit = _number(group["max_precond_dim"])
        if p.dim() == 1:
            return [p.shape[0]] if group["precondition_1d"] and p.shape[0] <= limit else [None]
        shape = self._merged_shape(p.shape, group) if group["merge_dims"] else list(p.shape)
        return [s if s <= limit else None for s in shape]

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        # Hyperparameters may have been edited in param_groups since the last call: check them before anything runs.
        for i, group in enumerate(self.param_groups):
            try:
                validate_hyperparameters(group)
            except ValueError as e:
                raise ValueError(f"param group {i}: {e}") from None
        loss = None
        if closure is not None:
            with torch.enable_grad():  # spec §6.1: the paper ran the closure under no_grad
                loss = closure()
        # Check every gradient before touching anything, so that a bad one (sparse, wrong shape) leaves the whole
        # optimizer unchanged, as CompiledSOAP does.
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    validate_grad(p)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                # The state is looked up here and handed over, never read from self.state inside _step_param:
                # under torch.compile the isfinite check below breaks the graph, _step_param becomes a frame of
                # its own, and there Dynamo would find its argument p among the keys of an optimizer's state and
                # drop the guard on p (it skips aliasing guards under optimizers), so the code compiled for one
                # parameter would run for the next (issue 28: a (4, 8) update added to a (4,) bias, or silently
                # wrong results for two parameters of one shape).
                self._step_param(p, self.state[p], group)
        return loss

    def _step_param(self, p: torch.Tensor, state: dict, group: dict) -> None:
        if "Q" in state and any(isinstance(q, list) for q in state["Q"]):
            # Written into optimizer.state in the checkpoint layout ([] for an absent factor), e.g. by
            # ZeroRedundancyOptimizer's loader: the in-memory form has None.
            for key in ("GG", "Q"):
                state[key] = [None if isinstance(m, list) else m for m in state[key]]
        grad = p.grad.to(state_dtype(p.dtype))
        initialised = "Q" in state
        if initialised:
            # §8: the refresh clock counts every call with a gradient after the initialisation call, skipped or not.
            state["refresh_clock"] += 1
        if not bool(torch.isfinite(grad).all()):
            # A NaN/Inf gradient would poison the factors and, through QR, the eigenbasis: skip this parameter.
            # Before its initialisation only the skip is counted (there is no clock yet).
            state["skipped"] = state.get("skipped", 0) + 1
            return

        if not initialised:
            # §3, first call: initialise the factors and eigenbases only. No moments, no parameter change, no
            # weight decay; step stays 0 (trap 1).
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
            state.setdefault("skipped", 0)
            state["refresh_clock"] = 0
            self._init_factors(grad, state, group)
            self._update_preconditioner(grad, state, group)
            return

        lr, eps, weight_decay = _number(group["lr"]), _number(group["eps"]), _number(group["weight_decay"])
        if isinstance(lr, torch.Tensor):  # any one-element shape torch.optim accepts ([], [1], [1, 1]) as a scalar
            lr = lr.reshape(())
        beta1, beta2 = (_number(b) for b in group["betas"])
        # §3.1: project with the current basis.
        grad_projected = self._project(grad, state, group)
        state["step"] += 1
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        # §3.3: multiply then add, both moments from the projected gradient.
        exp_avg.mul_(beta1).add_(grad_projected, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).add_(grad_projected.square(), alpha=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(eps)
        # §3.5: bias correction folded into the step size (so eps is not bias-corrected: HF convention).
        step_size = lr
        if group["correct_bias"]:
            bias_correction1 = 1.0 - beta1 ** state["step"]
            bias_correction2 = 1.0 - beta2 ** state["step"]
            step_size = step_size * (bias_correction2**0.5) / bias_correction1
        # §3.6: U = Q_L (M / denom) Q_R^T.
        update = self._project_back(exp_avg / denom, state, group)
        if group["normalize_grads"]:
            update = update / (1e-30 + torch.mean(update**2) ** 0.5)
        p.add_(update, alpha=-step_size)
        # §3.9 / trap 5: decoupled weight decay on the already-updated weights, plain lr, only when > 0.
        if weight_decay > 0.0:
            p.add_(p, alpha=-lr * weight_decay)
        # §3.10 / trap 2: the preconditioner sees the gradient only after it was used.
        self._update_preconditioner(grad, state, group)

    # ------------------------------------------------------------------ structure (§5)

    @staticmethod
    def _merged_shape(shape: torch.Size, group: dict) -> list[int]:
        """§5's greedy merge, on the NCHW order for channels_last 4-D tensors."""
        if group["data_format"] == "channels_last" and len(shape) == 4:
            shape = (shape[0], shape[3], shape[1], shape[2])
        limit = _number(group["max_precond_dim"])
        merged: list[int] = []
        running = 1
        for size in shape:
            if running * size > limit:
                if running > 1:
                    merged.append(running)
                    running = size
                else:
                    merged.append(size)
                    running = 1
            else:
                running *= size
        if running > 1 or not merged:
            merged.append(running)
        return merged

    def _merge(self, x: torch.Tensor, group: dict) -> torch.Tensor:
        merged = self._merged_shape(x.shape, group)
        if group["data_format"] == "channels_last" and x.dim() == 4:
            x = x.permute(0, 3, 1, 2)
        return x.reshape(merged)

    @staticmethod
    def _unmerge(x: torch.Tensor, original_shape: torch.Size, group: dict) -> torch.Tensor:
        if group["data_format"] == "channels_last" and len(original_shape) == 4:
            n, h, w, c = original_shape
            return x.reshape(n, c, h, w).permute(0, 2, 3, 1)
        return x.reshape(original_shape)

    def _init_factors(self, grad: torch.Tensor, state: dict, group: dict) -> None:
        # One square factor per (merged) axis; None where the axis is not preconditioned.
        sizes = self._factor_sizes(grad, group)
        state["GG"] = [None if s is None else grad.new_zeros(s, s) for s in sizes]
        state["Q"] = None
        # Trap 6: both are frozen per parameter at its first step.
        state["precondition_frequency"] = int(group["precondition_frequency"])
        sb = _number(group["shampoo_beta"])
        state["shampoo_beta"] = sb if sb >= 0 else _number(group["betas"][1])

    # ------------------------------------------------------------------ projections (§5)

    def _project(self, x: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """Q_k^T along every axis k: contract the leading axis with Q_k's rows and rotate it to the end."""
        return self._rotate(x, state, group, contract_dim=0)

    def _project_back(self, x: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """Q_k along every axis k: the same cycle, contracting with Q_k's columns."""
        return self._rotate(x, state, group, contract_dim=1)

    def _rotate(self, x: torch.Tensor, state: dict, group: dict, contract_dim: int) -> torch.Tensor:
        original_shape = x.shape
        if group["merge_dims"]:
            x = self._merge(x, group)
        for q in state["Q"]:
            if q is None:
                x = x.permute(*range(1, x.dim()), 0)
            else:
                # After all axes are visited the axis order is back to the original one.
                x = torch.tensordot(x, q, dims=[[0], [contract_dim]])
        if group["merge_dims"]:
            x = self._unmerge(x, original_shape, group)
        return x

    # ------------------------------------------------------------------ preconditioner (§3.10, §4)

    def _update_preconditioner(self, grad: torch.Tensor, state: dict, group: dict) -> None:
        if state["Q"] is not None:
            # §3.10a: momentum back to the original space with the OLD basis.
            state["exp_avg"] = self._project_back(state["exp_avg"], state, group)
        beta = state["shampoo_beta"]
        if grad.dim() == 1:
            if state["GG"][0] is not None:
                state["GG"][0].lerp_(grad.unsqueeze(1) @ grad.unsqueeze(0), 1 - beta)
        else:
            g = self._merge(grad, group) if group["merge_dims"] else grad
            for axis, factor in enumerate(state["GG"]):
                if factor is None:
                    continue
                # Mode-k Gram matrix: contract every other axis of g with itself.
                others = [*chain(range(axis), range(axis + 1, g.dim()))]
                factor.lerp_(torch.tensordot(g, g, dims=[others, others]), 1 - beta)

        if state["Q"] is None:
            state["Q"] = self._eigenbasis(state["GG"])
        # §3.10c with §8: refresh on the refresh clock (equal to the step when no call was skipped). Not at the
        # initialisation call (step 0), whose clock is 0 as well.
        if state["step"] > 0 and state["refresh_clock"] % state["precondition_frequency"] == 0:
            state["Q"] = self._refresh_eigenbasis(state, group)
        if state["step"] > 0:
            # §3.10d: momentum into the (possibly new) basis.
            state["exp_avg"] = self._project(state["exp_avg"], state, group)

    @staticmethod
    def _eigenbasis(factors: list) -> list:
        """Initial eigenbasis: eigh, columns by descending eigenvalue (§3, first call)."""
        bases = []
        for f in factors:
            if f is None:
                bases.append(None)
                continue
            eye = torch.eye(f.shape[0], device=f.device, dtype=f.dtype)
            try:
                _, q = torch.linalg.eigh(f + 1e-30 * eye)
            except RuntimeError:  # the paper retries an ill-conditioned fp32 factor in fp64
                _, q = torch.linalg.eigh(f.double() + 1e-30 * eye.double())
                q = q.to(f.dtype)
            bases.append(torch.flip(q, [1]))
        return bases

    def _refresh_eigenbasis(self, state: dict, group: dict) -> list:
        """§4: one sorted power-iteration step with QR per factor, permuting exp_avg_sq to match."""
        exp_avg_sq = state["exp_avg_sq"]
        original_shape = exp_avg_sq.shape
        if group["merge_dims"]:
            exp_avg_sq = self._merge(exp_avg_sq, group)
        bases = []
        for axis, (f, q) in enumerate(zip(state["GG"], state["Q"])):
            if f is None:
                bases.append(None)
                continue
            # Trap 3: eigenvalues estimated with the OLD basis and the UPDATED factor.
            estimated = torch.diag(q.T @ f @ q)
            order = torch.argsort(estimated, descending=True)
            # Trap 4: V is permuted, never rotated.
            exp_avg_sq = exp_avg_sq.index_select(axis, order)
            q = q[:, order]
            q, r = torch.linalg.qr(f @ q)
            if self.orthogonalization == "cholesky":  # the Gram-Schmidt signs: R with a positive diagonal
                q = q * torch.where(r.diagonal() < 0, -1.0, 1.0).to(q.dtype)
            bases.append(q)
        if group["merge_dims"]:
            exp_avg_sq = self._unmerge(exp_avg_sq, original_shape, group)
        state["exp_avg_sq"] = exp_avg_sq
        return bases

