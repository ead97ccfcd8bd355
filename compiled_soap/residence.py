"""Where each bucketed parameter and gradient lives, so that a step copies neither (docs/design.md §6).

With `storage="bucket"` (the default) a parameter moves into its slot of the bucket's stacked tensor when it
enters a bucket: the slot's memory is handed to the parameter as a storage of its own (`alias_of`), so the
compiled step updates the parameter where it is, while every serializer still sees one storage per parameter, of
the parameter's size (torch.save of one layer writes that layer only; safetensors, accelerate and HF see no
shared tensors to drop or clone). Gradients land in their slot through autograd hooks (`GradientRouter`): a
gradient autograd creates is copied into the slot, which becomes `p.grad`, and autograd's buffer is freed; later
accumulation (set_to_none=False, gradient accumulation) adds straight into the slot.

Each step checks on the host, without a device read, that every parameter still lives where the graph reads it
(address and strides; shape and dtype are checked by the shell). One that moved (`p.data = ...`, `model.to(...)`)
is copied in before the graph and out after it from then on, never moved back: the memory it left may be held by
the user. A parameter is left in its own memory from the start (and copied) when moving it could break something
the user relies on: its storage is shared with another tensor, it is a view into a larger buffer, it is a tensor
subclass (DTensor) or its memory layout is not the slot's. A gradient that autograd did not create (the user's
own buffer, DDP's gradient_as_bucket_view, an assigned tensor) is copied in at each step and never taken over.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch.utils.dlpack import from_dlpack, to_dlpack

from .compilation import opaque_to_dynamo
from .validation import is_dtensor

STORAGES = ("bucket", "separate")


def alias_of(slot: torch.Tensor) -> torch.Tensor:
    """A tensor over exactly `slot`'s memory, with a storage object of its own (keeping the bucket alive)."""
    return from_dlpack(to_dlpack(slot))


def _storage_users(t: torch.Tensor) -> Optional[int]:
    counter = getattr(torch._C, "_storage_Use_Count", None)
    return None if counter is None else counter(t.untyped_storage()._cdata)


def _sole_owner_of_memory(t: torch.Tensor) -> bool:
    """`t` is a dense tensor that alone uses its whole storage: nothing else sees the memory it would leave."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or is_dtensor(t) or t.numel() == 0 or t.is_sparse:
        return False
    if t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return False
    # 2: the tensor itself and the storage object asked for here; more means another tensor shares the memory.
    return _storage_users(t) == 2


def dense_strides(p: torch.Tensor) -> Optional[tuple]:
    """The strides a slot for `p` gets: `p`'s own when they are dense (contiguous, channels_last, permuted)."""
    like = torch.empty_like(p)
    return like.stride() if like.stride() == p.stride() else None


def can_move_into(p: torch.Tensor, slot: torch.Tensor) -> bool:
    return (p.device == slot.device and p.dtype == slot.dtype and p.shape == slot.shape and
            p.stride() == slot.stride() and _sole_owner_of_memory(p))


class Residence:
    """For one set of buckets (`Routes` order): which parameters live in their slots, and the per-step copies."""

    def __init__(self, params: list, param_slots: list, grad_slots: list, movable: list, storage: str):
        self.params, self.param_slots, self.grad_slots = params, param_slots, grad_slots
        self.resident = [False] * len(params)
        with torch.no_grad():
            for k, (p, slot) in enumerate(zip(params, param_slots)):
                slot.copy_(p)  # valid for every item, resident or not, before the first graph
                if storage == "bucket" and movable[k] and can_move_into(p, slot):
                    p.data = alias_of(slot)
                    self.resident[k] = True
        self._expect()

    def _expect(self) -> None:
        self.expected = [p.data_ptr() for p in self.params]
        self.strides = [p.stride() for p in self.params]
        self.copied = [k for k, r in enumerate(self.resident) if not r]
        self.resident_params = [p for p, r in zip(self.params, self.resident) if r]

    def moved(self) -> list:
        """Parameters that left their slots since they moved in (the host's only per-step check of parameters).
        The caller re-plans: the memory a parameter left may still be seen by the user, so no graph may write it
        again; other items that moved (left in their own memory from the start) are simply copied from there."""
        if [p.data_ptr() for p in self.params] == self.expected and [p.stride() for p in self.params] == self.strides:
            return []
        out = [p for p, s, r in zip(self.params, self.param_slots, self.resident)
               if r and (p.data_ptr() != s.data_ptr() or p.stride() != s.stride())]
        self._expect()
        return out

    def copies(self, grads: list, has_grad) -> tuple:
        """(grad slots, grads, param slots, params) still to copy in for the items with a gradient."""
        gs = self.grad_slots
        into = [k for k, g in enumerate(grads) if g is not None and g is not gs[k]]
        copied = [k for k in self.copied if has_grad[k]]
        return ([gs[k] for k in into], [grads[k] for k in into],
                [self.param_slots[k] for k in copied], [self.params[k] for k in copied])


class GradientRouter:
    """Autograd hooks that put each new gradient of a bucketed parameter into its gradient slot.

    A pre-hook notes whether `p.grad` was None when backward reached the parameter; if so, the gradient after
    accumulation is autograd's own fresh buffer and the post-accumulate hook moves it into the slot. Before the
    parameter has a slot (its first step), that buffer is remembered, and the step moves it when the slot exists.
    """

    def __init__(self):
        self.slot_of: dict = {}  # parameter -> its gradient slot
        self._fresh: dict = {}  # parameter -> p.grad was None when this backward reached it
        self._unplaced: dict = {}  # parameter -> weakref to the fresh gradient autograd made before it had a slot
        self._handles: list = []
        self._finalizer = weakref.finalize(self, _remove_all, self._handles)

    def watch(self, params: list) -> None:
        """Hook every plain parameter that gets gradients (replacing the hooks of an earlier parameter list)."""
        _remove_all(self._handles)
        self._fresh.clear()
        self._unplaced.clear()
        me = weakref.ref(self)
        for p in params:
            if type(p) in (torch.Tensor, torch.nn.Parameter) and p.is_leaf and p.requires_grad:
                self._handles.append(p.register_hook(_pre_hook(me, weakref.ref(p))))
                self._handles.append(p.register_post_accumulate_grad_hook(_post_hook(me)))

    def place(self, slots: dict) -> None:
        """New gradient slots (after a rebuild); fresh gradients made before a parameter had one move in now."""
        self.slot_of = slots
        for p, ref in list(self._unplaced.items()):
            slot = slots.get(p)
            if slot is not None:
                del self._unplaced[p]
                if p.grad is not None and p.grad is ref():
                    self._move(p, slot)

    def _after_accumulation(self, p: torch.Tensor) -> None:
        if not self._fresh.pop(p, False):
            return
        slot = self.slot_of.get(p)
        if slot is None:
            if p.grad is not None:
                self._unplaced[p] = weakref.ref(p.grad)
            return
        self._move(p, slot)

    @staticmethod
    def _move(p: torch.Tensor, slot: torch.Tensor) -> None:
        g = p.grad
        if g is None or g is slot or type(g) is not torch.Tensor or g.layout != torch.strided or g.requires_grad \
                or (g.dtype, g.shape, g.device) != (slot.dtype, slot.shape, slot.device):
            return
        with torch.no_grad():
            slot.copy_(g)
        p.grad = slot


def _pre_hook(router_ref, param_ref):
    @torch.utils.hooks.unserializable_hook
    @opaque_to_dynamo  # bookkeeping run by backward(): never traced, even under a user's torch.compile
    def hook(grad):
        router, p = router_ref(), param_ref()
        if router is not None and p is not None:
            router._fresh[p] = p.grad is None
    return hook


def _post_hook(router_ref):
    @torch.utils.hooks.unserializable_hook
    @opaque_to_dynamo  # bookkeeping run by backward(): never traced, even under a user's torch.compile
    def hook(p):
        router = router_ref()
        if router is not None:
            router._after_accumulation(p)
    return hook


def _remove_all(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()
