"""profiling/scale_estimate.py against numbers worked out by hand on a tiny model.

The tiny model, items in this order: three 4x6 matrices (A0, A1, A2), two length-6 vectors (B0, B1, no factor), one
5x3 matrix (C); max_precond_dim, precondition_frequency and the elementwise term at their defaults (10000, 10, 20 FLOPs
per element). The expected values below were computed on paper from the rules in the script's docstring (the
planner's greedy ownership, the flat all_gather, the exact all_to_all splits of dim-0 chunks), not by calling the
script's helpers.
"""

import pytest
import torch

from profiling import flop_model as fm
from profiling import scale_estimate as se

TINY = [(4, 6)] * 3 + [(6,)] * 2 + [(5, 3)]
P_TINY = 3 * 24 + 2 * 6 + 15  # 99

# FLOPs per item. A: unit = 2·4·24 + 2·6·24 = 480; plain 3 units; refresh 5 units + per factor M·Q 2s³ and a
# Householder QR forming Q (8/3)s³, i.e. (2 + 8/3)(4³ + 6³) = 14/3 · 280; both + 20 per element (480).
A_PLAIN, A_REFRESH = 1440.0 + 480, 2400.0 + 14 / 3 * 280 + 480
# C: unit = 2·5·15 + 2·3·15 = 240; QR and M·Q (2 + 8/3)(5³ + 3³) = 14/3 · 152; + 20·15.
C_PLAIN, C_REFRESH = 720.0 + 300, 1200.0 + 14 / 3 * 152 + 300
B_FLOPS = 20.0 * 6
A_COST = (9 * A_PLAIN + A_REFRESH) / 10  # 2146.67
C_COST = (9 * C_PLAIN + C_REFRESH) / 10  # 1138.93
# State bytes, fp32: 2·N + 2·s² per factored axis.
A_STATE, B_STATE, C_STATE = 4 * (2 * 24 + 2 * (16 + 36)), 4 * 12, 4 * (2 * 15 + 2 * (25 + 9))


def test_flop_model_counts_qr_forming_q():
    assert fm.QR_FLOPS_PER_S3 == pytest.approx(8 / 3)
    assert fm.refresh_extra_flops((4, 6)) == pytest.approx(2 * (64 + 216) + 8 / 3 * (64 + 216))
    assert fm.step_flops([(4, 6)], "batched", "refresh") == pytest.approx(A_REFRESH - 480)


def test_items_by_hand():
    items = se.make_items(TINY)
    a, b, c = items[0], items[3], items[5]
    assert [it.shape for it in items] == TINY
    assert (a.plain, a.refresh, a.cost) == pytest.approx((A_PLAIN, A_REFRESH, A_COST))
    assert (c.plain, c.refresh, c.cost) == pytest.approx((C_PLAIN, C_REFRESH, C_COST))
    assert (b.plain, b.refresh, b.cost) == pytest.approx((B_FLOPS, B_FLOPS, B_FLOPS))
    assert (a.state, b.state, c.state) == (A_STATE, B_STATE, C_STATE)


def test_chunk_rule():
    # torch.chunk gives ceil(d0/W) rows per chunk and fewer chunks when rows run out: the last ranks are empty.
    for d0, w in [(5, 2), (5, 4), (6, 4), (4, 4), (1, 8), (50257, 8), (7, 3)]:
        chunks = [len(x) for x in torch.arange(d0).chunk(w)]
        assert [se.dim0_rows(d0, w, r) for r in range(w)] == chunks + [0] * (w - len(chunks))
    assert [se.dim0_rows(5, 4, r) for r in range(4)] == [2, 2, 1, 0]


def test_estimate_w2_by_hand():
    e = se.estimate(se.make_items(TINY), 2)
    assert e.params == P_TINY
    # Greedy, classes in decreasing cost A, C, B. A: one each (A0 to rank 0, A1 to rank 1), the leftover A2 to rank 0
    # (tie: lowest rank). C to rank 1 (less loaded). B: one each. Rank 0 = A0, A2, B0; rank 1 = A1, C, B1.
    assert e.owners == (0, 1, 0, 0, 1, 1)
    assert e.rank_loads == pytest.approx((2 * A_COST + B_FLOPS, A_COST + C_COST + B_FLOPS))
    assert e.state_total == 3 * A_STATE + 2 * B_STATE + C_STATE
    assert e.state_rank_max == 2 * A_STATE + B_STATE
    assert e.state_bound == (3 * A_STATE + 2 * B_STATE + C_STATE) // 2 + A_STATE
    assert e.plain_rank_max == pytest.approx(2 * A_PLAIN + B_FLOPS)
    assert e.plain_saved == pytest.approx(A_PLAIN + C_PLAIN + B_FLOPS)
    assert e.refresh_saved == pytest.approx(A_REFRESH + C_REFRESH + B_FLOPS)
    # Flat all_gather: rank 0 owns 24 + 24 + 6 = 54 elements, rank 1 24 + 15 + 6 = 45; width 54. Each rank sends 54
    # and receives (W-1)·54 = 54; the output holds 2·54 = 108 for 99 elements: 9 of padding.
    assert e.rank_elems == (54, 45)
    assert (e.gather_width, e.gather_sent, e.gather_recv, e.gather_padding) == (54, 54, 54, 9)
    assert e.collectives_ddp == 1 and e.collectives_fsdp == 2
    # FSDP2, W = 2: A 2 rows x 6 = 12 on each rank; B 3 each; C (5 rows) 3 rows x 3 = 9 on rank 0, 2 x 3 = 6 on 1.
    # Before: rank 0 sends owner 1 its rows of A1, C, B1, parameter and gradient: 2·(12 + 9 + 3) = 48, and receives
    # rank 1's rows of A0, A2, B0: 2·(12 + 12 + 3) = 54; rank 1 the other way round.
    assert e.pre_sent == (48, 54) and e.pre_recv == (54, 48)
    # After: the owners send back the other rank's rows of their updated parameters.
    assert e.post_sent == (27, 24) and e.post_recv == (24, 27)
    assert (e.fsdp_pre, e.fsdp_post, e.fsdp_elems) == (54, 27, 81)
    # FSDP2's own: 3·(W-1)·ceil(d0/W) rows per item: A 12 each, B 3 each, C 9.
    assert e.fsdp_own_elems == 3 * (3 * 12 + 2 * 3 + 9)
    assert e.ddp_allreduce_elems == pytest.approx(2 * (1 / 2) * P_TINY)


def test_estimate_w4_by_hand():
    e = se.estimate(se.make_items(TINY), 4)
    # A: 3 items < 4 ranks, one each to ranks 0, 1, 2; C to rank 3; both B to rank 3, still the least loaded
    # (C + B = 1258.9 < A = 2146.7).
    assert e.owners == (0, 1, 2, 3, 3, 3)
    assert e.plain_rank_max == pytest.approx(A_PLAIN)
    assert e.state_rank_max == max(A_STATE, C_STATE + 2 * B_STATE)
    # Flat all_gather: ranks 0-2 own 24 elements, rank 3 15 + 6 + 6 = 27: width 27, received 3·27 = 81 per rank,
    # 4·27 - 99 = 9 of padding.
    assert e.rank_elems == (24, 24, 24, 27)
    assert (e.gather_width, e.gather_recv, e.gather_padding) == (27, 81, 9)
    # Chunks for W = 4: A 1 row x 6 on every rank; B (6) 2, 2, 2, 0; C (5 rows x 3) 2, 2, 1, 0 rows = 6, 6, 3, 0.
    # Before the step, rank 0 sends A1's rows to rank 1 and A2's to rank 2 (2·6 each), and to rank 3 its rows of C,
    # B0, B1: 2·(6 + 2 + 2) = 20: 44. Rank 1 the same; rank 2 2·6 + 2·6 + 2·(3 + 2 + 2) = 38; rank 3 2·6 to each
    # of ranks 0-2 = 36 (it has no rows of its own items).
    assert e.pre_sent == (44, 44, 38, 36)
    # Received: ranks 0-2 the three other rows of their A, 2·3·6 = 36; rank 3 all of C and both B: 2·(15 + 6 + 6).
    assert e.pre_recv == (36, 36, 36, 54)
    # After: each owner sends the others their rows; rank 0 receives A1 6, A2 6, C 6, B0 2, B1 2 = 22, rank 2
    # 6 + 6 + 3 + 2 + 2 = 19, rank 3 three rows of A, 18.
    assert e.post_sent == (18, 18, 18, 27)
    assert e.post_recv == (22, 22, 19, 18)
    assert (e.fsdp_pre, e.fsdp_post) == (54, 27)


def test_single_rank_is_replicated():
    e = se.estimate(se.make_items(TINY), 1)
    assert e.plain_saved == e.refresh_saved == e.amortized_saved == 0
    assert e.state_rank_max == e.state_total
    assert e.gather_recv == e.gather_sent == e.gather_padding == e.fsdp_elems == e.fsdp_own_elems == 0
    assert e.collectives_ddp == e.collectives_fsdp == 0


def test_1b_model_and_report(capsys):
    cfg = se.GPT_1B
    d, L = cfg.d_model, cfg.layers
    shapes = cfg.shapes()
    assert sum(se.numel(s) for _, s in shapes) == L * (12 * d * d + 13 * d) + (cfg.vocab + cfg.ctx + 2) * d
    assert cfg.d_mlp == 4 * d and 1.0e9 <= sum(se.numel(s) for _, s in shapes) <= 1.3e9
    items = se.make_items(shapes)
    # The planner's weight (compiled_soap.ownership.item_flops) is the flop model's amortized step: both count the QR
    # as (8/3)s³.
    for it in items:
        assert it.cost == pytest.approx(fm.amortized(it.plain, it.refresh, 10), rel=1e-12)
    e = se.estimate(items, 8)
    p = e.params
    assert sum(e.rank_elems) == p and e.gather_width == max(e.rank_elems)
    assert e.gather_recv >= p * 7 / 8
    # Every element sent is received; the pre-step traffic (parameter and gradient) is twice the post-step's.
    assert sum(e.pre_sent) == sum(e.pre_recv) == 2 * sum(e.post_sent) == 2 * sum(e.post_recv)
    assert e.amortized_rank_max <= e.amortized_bound
    assert se.main(["--world-sizes", "1,8", "--bus-gbps", "400", "--tflops", "400"]) == 0
    out = capsys.readouterr().out
    assert "1,114,290,176" in out and "within the bound" in out
