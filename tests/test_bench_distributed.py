"""profiling/bench_distributed.py: a tiny run at W = 1 and 2 (gloo, spawned processes), its numbers checked against
the model's parameters written out by hand; and the exchange arithmetic on a hand-worked case."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from compiled_soap.ownership import item_flops, state_bytes
from profiling import bench_distributed as bd

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

WIDTH, HIDDEN = 8, 12
# build_model(8, 12, 1): input Linear, one block (LayerNorm, Linear(8, 12), Linear(12, 8)), LayerNorm, output Linear
SHAPES = [(8, 8), (8,), (8,), (8,), (12, 8), (12,), (8, 12), (8,), (8,), (8,), (8, 8), (8,)]
FREQUENCY = 3
ARGS = ["--worlds", "1,2", "--width", str(WIDTH), "--hidden", str(HIDDEN), "--layers", "1", "--batch", "8",
        "--warmup", "2", "--steps", "2", "--precondition-frequency", str(FREQUENCY)]


def _hand_state_bytes(shape) -> int:
    """fp32 SOAP state: both moments; a factor and an eigenbasis per axis of a matrix (1-D: none by default)."""
    n = math.prod(shape)
    return 4 * (2 * n + (2 * sum(s * s for s in shape) if len(shape) == 2 else 0))


def test_model_is_the_one_written_out():
    assert [tuple(p.shape) for p in bd.build_model(WIDTH, HIDDEN, 1).parameters()] == SHAPES


def test_rows_consistent_with_the_parameters(capsys):
    rows = bd.main(ARGS)
    group = bd.hyper_group(FREQUENCY)
    total = sum(_hand_state_bytes(s) for s in SHAPES)
    assert total == 8480
    assert total == sum(state_bytes(s, torch.float32, group) for s in SHAPES)
    largest = max(_hand_state_bytes(s) for s in SHAPES)
    costs = [item_flops(s, group) for s in SHAPES]

    assert sorted((r["mode"], r["world"]) for r in rows) == sorted(
        (m, w) for m in ("ddp", "ddp shard=False", "fsdp2") for w in (1, 2))
    for r in rows:
        w, where = r["world"], (r["mode"], r["world"])
        assert len(r["state_bytes"]) == len(r["flops"]) == len(r["owned"]) == w, where
        assert r["state_total"] == total and r["state_largest"] == largest, where
        assert r["flops_total"] == pytest.approx(sum(costs)), where
        owned = sorted(i for o in r["owned"] for i in o)
        if r["mode"] == "ddp shard=False" or w == 1:  # every rank keeps and steps everything
            assert owned == sorted(list(range(len(SHAPES))) * w), where
            assert r["state_bytes"] == [total] * w, where
            assert r["flops"] == pytest.approx([sum(costs)] * w), where
            assert r["sent"] == [0] * w, where
        else:  # each parameter owned once; each rank's state and FLOPs within total/W + the largest item
            assert r["sharded"], where
            assert owned == list(range(len(SHAPES))), where
            assert sum(r["state_bytes"]) == total, where
            for o, b, f in zip(r["owned"], r["state_bytes"], r["flops"]):
                assert b == sum(_hand_state_bytes(SHAPES[i]) for i in o), where
                assert b <= total / w + largest, where
                assert f == pytest.approx(sum(costs[i] for i in o)), where
                assert f <= sum(costs) / w + max(costs) + 1e-6, where
            owners = [next(k for k, o in enumerate(r["owned"]) if i in o) for i in range(len(SHAPES))]
            assert r["sent_needed"] == bd.exchange_needed(SHAPES, [4] * len(SHAPES), owners, w, r["wrapper"] == "fsdp2")
            for needed, sent in zip(r["sent_needed"], r["sent"]):
                assert 0 < needed <= sent <= r["sent_padded"], where
        assert r["timed_steps"] == 2, where
        assert 0 < r["step_ms_median"] < 10_000 and math.isfinite(r["step_ms_mean"]), where
        if w == 1:
            assert r["vs_w1"] == 1.0, where
    # DDP at W=2: every parameter reaches the other rank once at least
    ddp2 = next(r for r in rows if r["mode"] == "ddp" and r["world"] == 2)
    assert sum(ddp2["sent"]) >= 4 * sum(math.prod(s) for s in SHAPES)
    out = capsys.readouterr().out
    assert "holds." in out and "FAILS" not in out


def test_exchange_arithmetic_by_hand():
    """Shapes (4, 3), (4, 3), (5,), owners 0, 1, 0, two ranks, fp32."""
    shapes, owners = [(4, 3), (4, 3), (5,)], [0, 1, 0]
    # replicated: rank 0 sends 12 + 5 elements to rank 1, rank 1 sends 12
    assert bd.exchange_needed(shapes, [4] * 3, owners, 2, fsdp=False) == [4 * 17, 4 * 12]
    assert bd.exchange_padded(shapes, [4] * 3, owners, 2, fsdp=False) == 4 * (12 + 5)
    # dim-0 sharded, rows (2, 2) and (3, 2): rank 0 sends rank 1's rows of parameters 0 and 2 after the step (6 + 2)
    # and its rows of parameter 1 and its gradient before it (2 * 6); rank 1 the mirror: 2 * 6 + 2 * 2 before, 6 after
    assert bd.exchange_needed(shapes, [4] * 3, owners, 2, fsdp=True) == [4 * 20, 4 * 22]
    assert bd.exchange_padded(shapes, [4] * 3, owners, 2, fsdp=True) == 4 * (3 * 2 * 3 + 3 * 3)
