"""Direct unit tests of compiled_soap.planning: merged shapes, layouts, the channels_last view, bucket keys, plans.

Every expectation is written out here (the examples of docs/spec.md §5, hand-derived layouts, explicit per-item
permutes), never taken from the module under test.
"""

from __future__ import annotations

import pytest
import torch

from compiled_soap.planning import (BucketKey, BucketPlan, Layout, bucket_key, from_merged, layout_of, make_plan,
                                    merge_shape, to_merged)


def group(**overrides) -> dict:
    """The structural options of a param group, with SOAP's defaults (spec §1)."""
    g = {"max_precond_dim": 10000, "merge_dims": False, "precondition_1d": False, "data_format": "channels_first"}
    g.update(overrides)
    return g


# ------------------------------------------------------------------------------------------------- merge_shape

# Every example of spec §5 that involves no channels_last permutation: (shape, max_precond_dim, merged shape).
SPEC_EXAMPLES = [
    ((4, 3, 3, 2), 10000, (72,)),
    ((64, 3, 3, 3), 10000, (1728,)),
    ((512, 256, 3, 3), 10000, (512, 2304)),
    ((20000, 3), 10000, (20000, 3)),
    ((1, 6), 10000, (6,)),
    ((1, 1), 10000, (1,)),
    ((64, 64), 10000, (4096,)),
    ((4, 3, 3, 2), 8, (4, 3, 6)),
    ((8, 1, 1, 8), 8, (8, 8)),
]


@pytest.mark.parametrize("shape, limit, expected", SPEC_EXAMPLES)
def test_merge_shape_spec_examples(shape, limit, expected):
    assert tuple(merge_shape(shape, limit)) == expected


@pytest.mark.parametrize("shape, limit, expected", SPEC_EXAMPLES)
def test_layout_of_merges_spec_examples(shape, limit, expected):
    layout = layout_of(shape, group(merge_dims=True, max_precond_dim=limit))
    assert layout.shape == shape
    assert tuple(layout.merged_shape) == expected
    assert layout.channels_last is False
    assert tuple(layout.factor_sizes) == tuple(s if s <= limit else None for s in expected)


def test_merge_shape_hand_worked_cases():
    # A leading axis above the limit is emitted alone and the running product stays 1 (spec §5's else branch).
    assert tuple(merge_shape((30, 2, 3), 10)) == (30, 6)
    # Exactly at the limit still merges (the test is `>`), the next axis then starts a new run.
    assert tuple(merge_shape((2, 5, 3), 10)) == (10, 3)
    # Two oversized axes in a row, then a small one.
    assert tuple(merge_shape((11, 12, 2), 10)) == (11, 12, 2)
    # No axes at all: a single axis of size 1 (the `out == []` case of the pseudo-code).
    assert tuple(merge_shape((), 10)) == (1,)


def test_layout_of_channels_last_spec_example():
    # Spec §5: max_precond_dim = 10 and channels_last, (2,5,5,3) -> NCHW (2,3,5,5) -> [6,5,5].
    layout = layout_of((2, 5, 5, 3), group(merge_dims=True, max_precond_dim=10, data_format="channels_last"))
    assert layout == Layout((2, 5, 5, 3), (6, 5, 5), True, (6, 5, 5))
    # The same tensor read as channels_first merges differently: (2,5) -> 10, then 5, then 3.
    first = layout_of((2, 5, 5, 3), group(merge_dims=True, max_precond_dim=10))
    assert tuple(first.merged_shape) == (10, 5, 3)
    assert first.channels_last is False


# ----------------------------------------------------------------------------------------------- layout_of

def test_layout_of_1d_without_precondition_1d():
    layout = layout_of((7,), group())
    assert layout == Layout((7,), (7,), False, (None,))


def test_layout_of_1d_with_precondition_1d():
    layout = layout_of((7,), group(precondition_1d=True))
    assert layout == Layout((7,), (7,), False, (7,))
    # At the limit it keeps its factor (only `>` drops it).
    assert layout_of((7,), group(precondition_1d=True, max_precond_dim=7)).factor_sizes == (7,)


def test_layout_of_1d_above_max_precond_dim():
    layout = layout_of((12,), group(precondition_1d=True, max_precond_dim=10))
    assert layout == Layout((12,), (12,), False, (None,))
    # merge_dims does not change a 1-D parameter, even channels_last.
    merged = layout_of((12,), group(precondition_1d=True, max_precond_dim=10, merge_dims=True,
                                    data_format="channels_last"))
    assert merged == Layout((12,), (12,), False, (None,))


def test_layout_of_0d():
    layout = layout_of((), group())
    assert layout.shape == ()
    assert tuple(layout.merged_shape) == ()
    assert tuple(layout.factor_sizes) == ()
    assert layout.channels_last is False


def test_layout_of_2d_without_merge():
    layout = layout_of((6, 4), group())
    assert layout == Layout((6, 4), (6, 4), False, (6, 4))


def test_layout_of_factor_sizes_none_above_max_precond_dim():
    # Without merging: each axis on its own, `>` the limit means no factor, `==` keeps it.
    assert layout_of((10, 11), group(max_precond_dim=10)).factor_sizes == (10, None)
    assert layout_of((12, 3, 40), group(max_precond_dim=10)).factor_sizes == (None, 3, None)
    # With merging: the merged axes are what is compared.
    layout = layout_of((20000, 3), group(merge_dims=True))
    assert tuple(layout.merged_shape) == (20000, 3)
    assert tuple(layout.factor_sizes) == (None, 3)
    layout = layout_of((4, 11, 2, 5), group(merge_dims=True, max_precond_dim=10))
    assert tuple(layout.merged_shape) == (4, 11, 10)
    assert tuple(layout.factor_sizes) == (4, None, 10)


@pytest.mark.parametrize("overrides, shape", [
    ({"merge_dims": False, "data_format": "channels_last"}, (2, 5, 5, 3)),  # channels_last needs merge_dims
    ({"merge_dims": True, "data_format": "channels_last"}, (2, 5, 5)),  # ... and a 4-D tensor
    ({"merge_dims": True, "data_format": "channels_last"}, (2, 5, 5, 3, 2)),
    ({"merge_dims": True, "data_format": "channels_first"}, (2, 5, 5, 3)),
])
def test_layout_of_channels_last_only_with_merge_dims_and_4d(overrides, shape):
    layout = layout_of(shape, group(max_precond_dim=10, **overrides))
    assert layout.channels_last is False
    if not overrides["merge_dims"]:
        assert tuple(layout.merged_shape) == shape


def test_layout_of_channels_last_true():
    layout = layout_of((3, 2, 2, 4), group(merge_dims=True, data_format="channels_last"))
    # NCHW (3,4,2,2) has 48 elements <= 10000: one merged axis.
    assert layout == Layout((3, 2, 2, 4), (48,), True, (48,))


# ----------------------------------------------------------------------------------- to_merged / from_merged

def test_to_merged_channels_last_is_per_item_permute_then_reshape():
    layout = layout_of((2, 5, 5, 3), group(merge_dims=True, max_precond_dim=10, data_format="channels_last"))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 5, 5, 3, generator=gen, dtype=torch.float64)
    merged = to_merged(x, layout)
    assert tuple(merged.shape) == (3, 6, 5, 5)
    for b in range(3):
        expected = x[b].permute(0, 3, 1, 2).reshape(6, 5, 5)
        assert torch.equal(merged[b], expected)
    # Element by element for one item, from the definition: merged[n*C + c, h, w] = x[n, h, w, c].
    for n in range(2):
        for c in range(3):
            assert torch.equal(merged[1, n * 3 + c], x[1, n, :, :, c])


def test_channels_last_round_trip():
    layout = layout_of((2, 5, 5, 3), group(merge_dims=True, max_precond_dim=10, data_format="channels_last"))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 5, 5, 3, generator=gen)
    back = from_merged(to_merged(x, layout), layout)
    assert back.shape == x.shape
    assert torch.equal(back, x)
    # And the other way round, from an arbitrary merged tensor.
    y = torch.randn(4, 6, 5, 5, generator=gen)
    again = to_merged(from_merged(y, layout), layout)
    assert torch.equal(again, y)
    # from_merged places merged[b, n*C + c, h, w] at [b, n, h, w, c].
    z = from_merged(y, layout)
    for n in range(2):
        for c in range(3):
            assert torch.equal(z[2, n, :, :, c], y[2, n * 3 + c])


def test_to_merged_channels_first_is_a_reshape():
    layout = layout_of((4, 3, 3, 2), group(merge_dims=True, max_precond_dim=8))
    x = torch.arange(2 * 72, dtype=torch.float32).reshape(2, 4, 3, 3, 2)
    merged = to_merged(x, layout)
    assert tuple(merged.shape) == (2, 4, 3, 6)
    for b in range(2):
        assert torch.equal(merged[b], x[b].reshape(4, 3, 6))
    assert torch.equal(from_merged(merged, layout), x)


# ------------------------------------------------------------------------------------------------ bucket_key

def test_bucket_key_equal_for_same_device_dtype_layout_frequency_phase():
    a = torch.zeros(4, 3)
    b = torch.ones(4, 3)  # another tensor, same structure
    g = group()
    # Phase is refresh_clock % frequency: clocks 2, 12 and 22 have phase 2 with f = 10.
    ka, kb, kc = bucket_key(a, g, 10, 2), bucket_key(b, g, 10, 12), bucket_key(b, dict(g), 10, 22)
    assert ka == kb == kc
    assert hash(ka) == hash(kb)
    assert isinstance(ka, BucketKey)
    assert ka.phase == 2 and ka.frequency == 10
    assert ka.device == a.device and ka.dtype == torch.float32
    assert ka.layout == Layout((4, 3), (4, 3), False, (4, 3))


def test_bucket_key_different_when_anything_differs():
    g = group()
    base = bucket_key(torch.zeros(4, 3), g, 10, 2)
    assert bucket_key(torch.zeros(4, 3, device="meta"), g, 10, 2) != base  # device
    assert bucket_key(torch.zeros(4, 3, dtype=torch.float64), g, 10, 2) != base  # dtype
    assert bucket_key(torch.zeros(4, 3, dtype=torch.bfloat16), g, 10, 2) != base
    assert bucket_key(torch.zeros(3, 4), g, 10, 2) != base  # shape, so layout
    assert bucket_key(torch.zeros(4, 3), group(max_precond_dim=3), 10, 2) != base  # layout: factor_sizes
    assert bucket_key(torch.zeros(4, 3), group(merge_dims=True), 10, 2) != base  # layout: merged shape
    assert bucket_key(torch.zeros(4, 3), g, 5, 2) != base  # frequency
    assert bucket_key(torch.zeros(4, 3), g, 10, 3) != base  # phase
    assert bucket_key(torch.zeros(4, 3), g, 10, 13) != base


def test_bucket_key_phase_is_clock_modulo_frequency():
    p = torch.zeros(2)
    for frequency, clock in [(1, 0), (1, 7), (3, 0), (3, 4), (3, 8), (10, 9), (10, 10), (7, 100)]:
        assert bucket_key(p, group(), frequency, clock).phase == clock % frequency
    # Same phase through different clocks, different frequencies: still different keys.
    assert bucket_key(p, group(), 3, 4) != bucket_key(p, group(), 4, 5)


# ------------------------------------------------------------------------------------------------- make_plan

@pytest.mark.parametrize("dtype, expected", [
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
])
def test_make_plan_state_dtype(dtype, expected):
    p = torch.zeros(5, 2, dtype=dtype)
    key = bucket_key(p, group(), 10, 0)
    plan = make_plan(key, 3)
    assert isinstance(plan, BucketPlan)
    assert plan.state_dtype == expected
    assert plan.param_dtype == dtype
    assert plan.size == 3
    assert plan.layout == Layout((5, 2), (5, 2), False, (5, 2))
