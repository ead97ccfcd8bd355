"""What two SOAP runs may be asked to share, and how closely, when they are not the same computation.

Bitwise equality is asked only where it is guaranteed: the same process, the same kernels on the same memory layout
(a resume, a deep copy, a replay of recorded gradients laid out as they were). Anywhere else the low bits are luck:

- A CPU BLAS rounds differently with the operands' address alignment. Found here (issue 26): MKL on an AMD EPYC
  computes G @ G.T for a 6x6 float32 gradient 4.8e-7 away from itself when the gradient is a view 6 floats into
  DDP's bucket (gradient_as_bucket_view) instead of a fresh, 64-byte aligned tensor; a view 16 floats (64 bytes)
  in rounds like the fresh tensor. Stacking a parameter in another bucket (another world size,
  another set of owners) moves its slot the same way.
- Other processes, thread counts and CPUs may pick other kernels.

SOAP then amplifies the difference. Its first update is Adam's first step, m / (sqrt(v) + eps) with m and sqrt(v)
both |g| (after bias correction): about sign(g) per eigen-direction. A direction whose projected gradient is rounding
noise (|g| ~ 1e-7 |G| in float32, above eps = 1e-8) gets a sign that is luck, and a parameter moves by up to 2 lr
differently: 5.8e-3 after 8 calls, where the inputs differed in their last bit.

In float64 the noise is 1e-16 |G|, far below eps: the update is then linear in it, off by at most about
lr * 1e-16 |G| / eps = lr * 1e-8 |G| per call. With |G| < 10 and a movement of about lr per call, that is below
1e-6 of the movement however many calls, while any real fault (a stale or missing gradient, a missed refresh, a
lost state) moves a parameter by a good part of lr. So cross-run comparisons run in float64, against that bound.

One more condition: the first eigh must not have a null space to fill (docs/spec.md trap 7). A factor of rank below
its size (the 8x8 right factor of one 4x8 gradient) gets eigenvectors there that depend on its last bits, and runs
then part by a good part of their movement in any precision (a third, measured in tests/test_user_compile.py).
Runs compared within the bound have full-rank first factors (square layers, batch >= width) or an integer-valued
first gradient, whose Gram matrices are exact in any kernel and bucket, so that every run's first eigh gets the same
input.
"""

from __future__ import annotations

import torch

MOVEMENT_FRACTION = 1e-6  # float64 only: see the module docstring


def agree(got: list, want: list, start: list) -> str:
    """'bitwise', or 'within 1e-6 of the movement' (float64 runs), else an AssertionError naming the error."""
    if all(torch.equal(a, b) for a, b in zip(got, want)):
        return "bitwise"
    assert all(t.dtype == torch.float64 for t in want), "only float64 runs have a rounding bound (tests/agreement.py)"
    movement = max((b - s).abs().max().item() for b, s in zip(want, start))
    error = max((a - b).abs().max().item() for a, b in zip(got, want))
    assert movement > 0, "the runs did not move: nothing to compare"
    assert error <= MOVEMENT_FRACTION * movement, f"off by {error:.3g}, movement {movement:.3g}"
    return f"within {MOVEMENT_FRACTION:g} of the movement ({error / movement:.1e})"


def laid_out_like(layout: list, values: list) -> list:
    """Copies of `values` at the storage offsets and strides that `layout` (tensors, or their `layout_of`) had,
    sharing storages as they did: the same alignment, so the same BLAS rounding (see the module docstring).
    Fresh storages are allocated as torch allocates all CPU memory, 64-byte aligned."""
    storages, out = {}, []
    for (key, numel, offset, stride), v in zip(layout, values):
        if key not in storages:
            storages[key] = torch.zeros(numel, dtype=v.dtype)
        out.append(storages[key].as_strided(v.shape, stride, offset).copy_(v))
    return out


def layout_of(tensors: list) -> list:
    """(storage key, storage numel, offset, stride) of each tensor: what `laid_out_like` reproduces."""
    keys: dict = {}
    rows = []
    for t in tensors:
        storage = t.untyped_storage()
        key = keys.setdefault(storage.data_ptr(), len(keys))
        rows.append((key, storage.nbytes() // t.element_size(), t.storage_offset(), t.stride()))
    return rows
