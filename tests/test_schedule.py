"""The refresh schedule (docs/spec.md §8): exact, decided on the host, the same in SOAP and CompiledSOAP.

The expected schedule is computed here by an independent loop over the rule ("a call refreshes a parameter if it
has a finite gradient and its clock, the calls with a gradient since its first, is a multiple of f"); refreshes
are observed from the outside, as changes of the eigenbasis Q in `optimizer.state`.
"""

from __future__ import annotations

import pytest
import torch

from conftest import VARIANTS, full_rank_grads, make_params, relative_deviation
from compiled_soap import SOAP

SHAPES = [(5, 4), (6,), (3, 2, 2)]


def expected_refresh_calls(schedule, f):
    """schedule[call][k]: None (no gradient), "nan" or "ok" for parameter k. Returns, per parameter, the calls at
    which it refreshes."""
    out = [[] for _ in schedule[0]]
    clock = [None] * len(schedule[0])
    for call, row in enumerate(schedule):
        for k, what in enumerate(row):
            if what is None:
                continue
            if clock[k] is None:  # first call with a gradient: initialisation if finite, else nothing
                if what == "ok":
                    clock[k] = 0
                continue
            clock[k] += 1
            if what == "ok" and clock[k] % f == 0:
                out[k].append(call)
    return out


def _run(factory, schedule, f, dtype=torch.float64):
    params = make_params(SHAPES, dtype)
    start = [p.detach().clone() for p in params]
    opt = factory(params, precondition_frequency=f, weight_decay=0.01)
    refreshed = [[] for _ in params]
    kinds = []
    for call, row in enumerate(schedule):
        before = [[None if q is None else q.clone() for q in opt.state[p]["Q"]] if "Q" in opt.state[p] else None
                  for p in params]
        for p, g, what in zip(params, full_rank_grads(params, call), row):
            p.grad = None if what is None else (g if what == "ok" else torch.full_like(g, float("nan")))
        opt.step()
        kinds.append(getattr(opt, "last_step_kind", None))
        for k, p in enumerate(params):
            q_before = before[k]
            if q_before is not None and any(a is not None and not torch.equal(a, b)
                                            for a, b in zip(q_before, opt.state[p]["Q"])):
                refreshed[k].append(call)
    return params, start, refreshed, kinds


def _schedule(calls, n, nan=(), missing=()):
    return [[None if (c, k) in missing else ("nan" if (c, k) in nan else "ok") for k in range(n)]
            for c in range(calls)]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_refresh_count_exact_without_reading_the_device(name):
    """101 calls at f=10, no skipped step: the first call initialises, then exactly 10 refreshes."""
    schedule = _schedule(101, len(SHAPES))
    _, _, refreshed, kinds = _run(VARIANTS[name], schedule, 10, torch.float32)
    expected = expected_refresh_calls(schedule, 10)
    assert expected[0] == list(range(10, 101, 10))
    # The 1-D parameter has no factor (precondition_1d=False), so nothing to observe there.
    assert refreshed[0] == expected[0] and refreshed[2] == expected[2]
    if name != "soap":
        assert [c for c, k in enumerate(kinds) if k == "refresh"] == expected[0]
        assert kinds.count("refresh") == 10


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "soap"])
def test_schedule_with_skips_and_missing_gradients_matches_reference(name):
    """Non-finite gradients on due and not-due calls, and calls without a gradient: the refresh calls follow the
    rule, the refresh graph runs exactly when some parameter is due, and the result equals SOAP's."""
    f, calls = 3, 17
    nan = {(3, 0), (5, 0), (6, 2), (9, 1), (12, 0), (12, 2)}
    missing = {(2, 1), (7, 0), (8, 0), (10, 2), (0, 2)}
    schedule = _schedule(calls, len(SHAPES), nan, missing)
    expected = expected_refresh_calls(schedule, f)
    ref, start, ref_refreshed, _ = _run(SOAP, schedule, f)
    got, _, refreshed, kinds = _run(VARIANTS[name], schedule, f)
    assert ref_refreshed[0] == expected[0] and ref_refreshed[2] == expected[2]
    assert refreshed[0] == expected[0] and refreshed[2] == expected[2]
    # The refresh graph runs when some parameter with a gradient is due by its clock (even if its gradient then
    # turns out non-finite: the host cannot know that), and only then.
    due_calls = sorted({c for k in range(len(SHAPES)) for c in _due_by_clock(schedule, f, k)})
    assert [c for c, k in enumerate(kinds) if k == "refresh"] == due_calls
    assert relative_deviation(got, ref, start) < 1e-10


def _due_by_clock(schedule, f, k):
    clock, out = None, []
    for call, row in enumerate(schedule):
        if row[k] is None:
            continue
        if clock is None:
            clock = 0 if row[k] == "ok" else None
            continue
        clock += 1
        if clock % f == 0:
            out.append(call)
    return out


def test_late_parameter_cohort_refreshes_on_its_own_phase():
    """A parameter whose first gradient comes 2 calls late refreshes 2 calls later than the others."""
    f, calls = 4, 14
    schedule = _schedule(calls, len(SHAPES), missing={(0, 0), (1, 0)})
    expected = expected_refresh_calls(schedule, f)
    assert expected[0] != expected[2]
    ref, start, ref_refreshed, _ = _run(SOAP, schedule, f)
    got, _, refreshed, kinds = _run(VARIANTS["stacked-eager"], schedule, f)
    assert refreshed[0] == expected[0] == ref_refreshed[0]
    assert refreshed[2] == expected[2] == ref_refreshed[2]
    assert relative_deviation(got, ref, start) < 1e-10
