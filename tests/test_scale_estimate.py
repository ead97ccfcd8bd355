"""profiling/scale_estimate.py against numbers worked out by hand on a tiny model, and the greedy ownership's bound.

The tiny model: three 4x6 matrices (A), two length-6 vectors (B, no factor), one 5x3 matrix (C); max_precond_dim,
precondition_frequency and the elementwise term at their defaults (10000, 10, 20 FLOPs per element). The expected
values below were computed on paper from the rules in the script's docstring, not by calling the script's helpers.
"""

import random

import pytest

from profiling import scale_estimate as se

TINY = [(4, 6)] * 3 + [(6,)] * 2 + [(5, 3)]

# FLOPs per item. A: unit = 2·4·24 + 2·6·24 = 480; plain 3 units; refresh 5 units + (2 + 4/3)(4³ + 6³);
# both + 20 per element.
A_PLAIN, A_REFRESH = 1440.0 + 480, 2400.0 + 10 / 3 * 280 + 480
# C: unit = 2·5·15 + 2·3·15 = 240.
C_PLAIN, C_REFRESH = 720.0 + 300, 1200.0 + 10 / 3 * 152 + 300
B_FLOPS = 20.0 * 6
A_COST = (9 * A_PLAIN + A_REFRESH) / 10
C_COST = (9 * C_PLAIN + C_REFRESH) / 10


def test_classes_by_hand():
    classes = se.item_classes(TINY)
    by_shape = {c.shape: c for c in classes}
    assert [c.shape for c in classes] == [(4, 6), (6,), (5, 3)]
    assert [c.count for c in classes] == [3, 2, 1]
    a, b, c = by_shape[(4, 6)], by_shape[(6,)], by_shape[(5, 3)]
    # State elements: 2·N + 2·s² per factored axis.
    assert (a.state, b.state, c.state) == (2 * 24 + 2 * (16 + 36), 12, 2 * 15 + 2 * (25 + 9))
    assert (a.plain, a.refresh) == pytest.approx((A_PLAIN, A_REFRESH))
    assert (c.plain, c.refresh) == pytest.approx((C_PLAIN, C_REFRESH))
    assert (b.plain, b.refresh, b.cost) == (B_FLOPS, B_FLOPS, B_FLOPS)
    assert a.cost == pytest.approx(A_COST) and c.cost == pytest.approx(C_COST)


def test_estimate_w2_by_hand():
    e = se.estimate(se.item_classes(TINY), 2)
    assert e.params == 3 * 24 + 2 * 6 + 15
    assert e.state_total == 4 * (3 * 152 + 2 * 12 + 98)
    # Greedy, classes in decreasing cost A, C, B. A: one each, the third to rank 0 (tie on load and count).
    # C: its single item to rank 1 (less loaded). B: one each. Rank 0 = 2A + B, rank 1 = A + C + B.
    assert e.state_rank_max == 4 * (2 * 152 + 12)
    assert e.state_bound == 4 * (578 // 2 + 152)
    assert e.plain_total == pytest.approx(3 * A_PLAIN + C_PLAIN + 2 * B_FLOPS)
    assert e.plain_rank_max == pytest.approx(2 * A_PLAIN + B_FLOPS)
    assert e.plain_saved == pytest.approx(A_PLAIN + C_PLAIN + B_FLOPS)
    assert e.refresh_rank_max == pytest.approx(2 * A_REFRESH + B_FLOPS)
    assert e.refresh_saved == pytest.approx(A_REFRESH + C_REFRESH + B_FLOPS)
    assert e.rank_loads == pytest.approx((2 * A_COST + B_FLOPS, A_COST + C_COST + B_FLOPS))
    # m per class: A 2, B 1, C 1. All-gather on the wire per rank: (W-1)·Σ m·N.
    assert e.ddp_gather_elems == 1 * (2 * 24 + 1 * 6 + 1 * 15)
    # Only C has fewer items than W: its broadcast costs N (here the same as its all-gather); A and B keep theirs.
    assert e.ddp_broadcast_small_elems == 2 * 24 + 1 * 6 + 15
    # Dim-0 shards for W=2: A 2 rows x 6, B 3, C ceil(5/2)=3 rows x 3.
    assert e.fsdp_pre_elems == 2 * 1 * (2 * 12 + 1 * 3 + 1 * 9)
    assert e.fsdp_post_elems == 1 * (2 * 12 + 1 * 3 + 1 * 9)
    assert e.fsdp_own_elems == 3 * 1 * (3 * 12 + 2 * 3 + 1 * 9)
    assert e.ddp_allreduce_elems == pytest.approx(2 * (1 / 2) * 99)
    assert (e.collectives_ddp, e.collectives_fsdp) == (3, 6)


def test_estimate_w4_padding_by_hand():
    e = se.estimate(se.item_classes(TINY), 4)
    # A: ranks 0, 1, 2; C: rank 3; B: both to rank 3, still the least loaded after the first (C + B < A).
    assert e.ddp_gather_elems == 3 * (1 * 24 + 2 * 6 + 1 * 15)
    # Every class has fewer than 4 items: broadcasting them all costs N per item.
    assert e.ddp_broadcast_small_elems == 3 * 24 + 2 * 6 + 15
    assert e.state_rank_max == 4 * max(152, 98 + 2 * 12)  # one A outweighs C and both B
    assert e.plain_rank_max == pytest.approx(A_PLAIN)
    # Shards for W=4: A 1 row x 6, B 2, C 2 rows x 3; m: A 1, B 2, C 1.
    assert e.fsdp_pre_elems == 2 * 3 * (6 + 2 * 2 + 6)


def test_single_rank_is_replicated():
    classes = se.item_classes(TINY)
    e = se.estimate(classes, 1)
    assert e.plain_saved == e.refresh_saved == e.amortized_saved == 0
    assert e.state_rank_max == e.state_total
    assert e.ddp_gather_elems == e.fsdp_pre_elems == e.fsdp_own_elems == e.collectives_ddp == 0


@pytest.mark.parametrize("seed", range(20))
def test_greedy_within_bound_on_random_costs(seed):
    rng = random.Random(seed)
    world = rng.choice([2, 3, 4, 8, 16])
    n_classes = rng.randint(1, 12)
    costs = [rng.choice([0.0, rng.uniform(0, 1), rng.uniform(0, 100)]) for _ in range(n_classes)]
    counts = [rng.randint(1, 40) for _ in range(n_classes)]
    owned, loads = se.greedy_assign(costs, counts, world)
    for c in range(n_classes):
        assert sum(owned[c]) == counts[c] and min(owned[c]) >= counts[c] // world
    recomputed = [sum(costs[c] * owned[c][r] for c in range(n_classes)) for r in range(world)]
    assert loads == pytest.approx(recomputed)
    total = sum(k * n for k, n in zip(costs, counts))
    assert max(loads) <= total / world + max(costs) + 1e-9 * max(total, 1.0)


def test_greedy_takes_costliest_classes_first():
    # Taken in the order given, the two light items would sit on different ranks and the heavy one on top of one.
    owned, loads = se.greedy_assign([1.0, 1.0, 2.0], [1, 1, 1], 2)
    assert loads == [2.0, 2.0] and owned == [[0, 1], [0, 1], [1, 0]]


def test_greedy_rejects_lopsided_assignment():
    # One class of 8 equal items on 4 ranks: exactly 2 each; then 3 big items must land on three different ranks.
    owned, loads = se.greedy_assign([10.0, 1.0], [3, 8], 4)
    assert owned[1] == [2, 2, 2, 2]
    assert sorted(owned[0]) == [0, 1, 1, 1]
    assert sorted(loads) == [2.0, 12.0, 12.0, 12.0]


def test_1b_model_and_report(capsys):
    cfg = se.GPT_1B
    d, L = cfg.d_model, cfg.layers
    shapes = cfg.shapes()
    assert sum(se.numel(s) for _, s in shapes) == L * (12 * d * d + 13 * d) + (cfg.vocab + cfg.ctx + 2) * d
    assert cfg.d_mlp == 4 * d and 1.0e9 <= sum(se.numel(s) for _, s in shapes) <= 1.3e9
    e = se.estimate(se.item_classes(shapes), 8)
    p = e.params
    # Unpadded, the formulas of the design: P·(W-1)/W gathered; padding can only add.
    assert e.ddp_gather_elems >= p * 7 / 8
    assert e.fsdp_elems >= 3 * p * 7 / 64
    assert e.amortized_rank_max <= e.amortized_bound
    assert se.main(["--world-sizes", "1,8", "--bus-gbps", "400", "--tflops", "400"]) == 0
    out = capsys.readouterr().out
    assert "1,114,290,176" in out and "within the bound" in out
