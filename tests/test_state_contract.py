"""The torch.optim contract, for every variant: `optimizer.state` is the truth users read and write, hooks fire,
copies and pickles continue, hyperparameters are checked whenever they change, unusual parameters work.

Where the behaviour is SOAP's, the expected result is SOAP doing the same thing (an independent implementation).
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from conftest import VARIANTS, bitwise_equal, full_rank_grads, make_params, relative_deviation
from compiled_soap import SOAP, CompiledSOAP

SHAPES = [(5, 4), (4,), (3, 2, 2)]
COMPILED = [n for n in VARIANTS if n != "soap"]


def _train(opt, params, calls, start=0, edit=None, edit_at=None):
    for t in range(start, start + calls):
        if edit is not None and t == edit_at:
            edit(opt, params)
        for p, g in zip(params, full_rank_grads(params, t)):
            p.grad = g
        opt.step()
    return params


def _reset_del(opt, params):
    del opt.state[params[0]]


def _reset_empty(opt, params):
    opt.state[params[2]] = {}


def _replace_moments(opt, params):
    s = opt.state[params[0]]
    s["exp_avg"] = torch.zeros_like(s["exp_avg"])
    s["exp_avg_sq"] = s["exp_avg_sq"] * 2


def _replace_whole_entry(opt, params):
    s = opt.state[params[2]]
    opt.state[params[2]] = {**{k: v for k, v in s.items()}, "exp_avg": torch.ones_like(s["exp_avg"])}


def _in_place_edit(opt, params):
    opt.state[params[0]]["exp_avg_sq"].mul_(3)


EDITS = {"del": _reset_del, "assign-empty": _reset_empty, "replace-tensors": _replace_moments,
         "replace-entry": _replace_whole_entry, "in-place": _in_place_edit}


@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize("name", COMPILED)
def test_state_edits_take_effect_like_in_soap(name, edit):
    """Resetting or replacing a parameter's state through `optimizer.state` changes what the next steps do,
    exactly as it does in SOAP."""
    dtype = torch.float64
    ref = make_params(SHAPES, dtype)
    got = make_params(SHAPES, dtype)
    start = [p.detach().clone() for p in ref]
    kw = dict(precondition_frequency=3)
    _train(SOAP(ref, **kw), ref, 9, edit=EDITS[edit], edit_at=5)
    opt = VARIANTS[name](got, **kw)
    _train(opt, got, 9, edit=EDITS[edit], edit_at=5)
    untouched = make_params(SHAPES, dtype)
    _train(VARIANTS[name](untouched, **kw), untouched, 9)
    assert relative_deviation(got, ref, start) < 1e-10
    assert relative_deviation(got, untouched, start) > 1e-6, "the edit had no effect"


@pytest.mark.parametrize("name", COMPILED)
def test_bad_state_edit_is_a_clear_error(name):
    params = make_params(SHAPES)
    opt = VARIANTS[name](params)
    _train(opt, params, 2)
    opt.state[params[0]]["exp_avg"] = torch.zeros(3, 3)
    params[0].grad = torch.ones(5, 4)
    with pytest.raises(ValueError, match="exp_avg has shape"):
        opt.step()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_state_dict_hooks_fire(name):
    params = make_params(SHAPES)
    opt = VARIANTS[name](params)
    _train(opt, params, 2)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append(("pre", o is opt)))

    def post(o, sd):
        calls.append(("post", o is opt))
        return {**sd, "note": "added by a hook"}

    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert calls == [("pre", True), ("post", True)] and sd["note"] == "added by a hook"

    loads = []

    def load_pre(o, sd):
        loads.append("pre")
        sd = dict(sd)
        sd.pop("note")
        return sd

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: loads.append("post"))
    opt.load_state_dict(sd)
    assert loads == ["pre", "post"]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_copies_continue_identically(name, how):
    """copy.deepcopy((model, opt)) and a pickle round trip give an optimizer of the copied parameters that
    continues exactly as the original does."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 3))
    opt = VARIANTS[name](model.parameters(), precondition_frequency=2)
    params = list(model.parameters())
    _train(opt, params, 3)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    params2 = list(model2.parameters())
    assert all(p2 is q for p2, q in zip(params2, opt2.param_groups[0]["params"]))
    _train(opt, params, 4, start=3)
    _train(opt2, params2, 4, start=3)
    assert bitwise_equal(params, params2)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("change", [{"betas": (1.0, 0.95)}, {"weight_decay": float("inf")}, {"eps": 0.0},
                                    {"lr": float("nan")}])
def test_hyperparameters_checked_again_when_changed(name, change):
    params = make_params(SHAPES)
    opt = VARIANTS[name](params)
    _train(opt, params, 2)
    before = [p.detach().clone() for p in params]
    opt.param_groups[0].update(change)
    for p, g in zip(params, full_rank_grads(params, 2)):
        p.grad = g
    with pytest.raises(ValueError, match=next(iter(change))):
        opt.step()
    assert bitwise_equal(params, before)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_numpy_scalars_accepted(name):
    a, b = make_params(SHAPES), make_params(SHAPES)
    kw = dict(lr=np.float32(3e-3), betas=(np.float64(0.9), 0.95), precondition_frequency=np.int64(2),
              max_precond_dim=np.int64(10000), weight_decay=np.float64(0.01))
    _train(VARIANTS[name](a, **kw), a, 5)
    plain = {k: (tuple(float(x) for x in v) if isinstance(v, tuple) else v.item()) for k, v in kw.items()}
    _train(VARIANTS[name](b, **plain), b, 5)
    assert bitwise_equal(a, b)


@pytest.mark.parametrize("cls", [SOAP, CompiledSOAP])
def test_duplicate_parameter_in_a_group_is_an_error(cls):
    p = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="same tensor"):
        cls([p, torch.nn.Parameter(torch.randn(2)), p])


@pytest.mark.parametrize("cls", [SOAP, CompiledSOAP])
def test_param_group_given_as_generator(cls):
    """[{"params": model.parameters()}] is the usual way to build groups; the check must not consume it."""
    model = torch.nn.Linear(3, 3)
    opt = cls([{"params": model.parameters(), "lr": 1e-2}])
    assert len(opt.param_groups[0]["params"]) == 2
    opt.add_param_group({"params": torch.nn.Linear(2, 2).parameters()})
    assert len(opt.param_groups[1]["params"]) == 2


@pytest.mark.parametrize("name", COMPILED)
def test_zero_size_parameter(name):
    """A (0, 5) parameter steps like in SOAP (its one real factor is 5x5) next to ordinary ones."""
    shapes = [(0, 5), (4, 3), (0,)]
    ref, got = make_params(shapes, torch.float64), make_params(shapes, torch.float64)
    ref_opt, opt = SOAP(ref, precondition_frequency=2), VARIANTS[name](got, precondition_frequency=2)
    _train(ref_opt, ref, 5)
    _train(opt, got, 5)
    assert bitwise_equal(ref[:1], got[:1]) and torch.allclose(ref[1], got[1], rtol=1e-12)
    assert int(opt.state[got[0]]["step"]) == int(ref_opt.state[ref[0]]["step"]) == 4
    torch.testing.assert_close(opt.state[got[0]]["Q"][1], ref_opt.state[ref[0]]["Q"][1])
