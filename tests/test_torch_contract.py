"""What torch.optim promises its users and wrappers, checked against torch.optim itself (AdamW as the witness).

Each test runs the same input through `torch.optim.AdamW` and through a variant of tests/registry.py and expects the
same observable behaviour: named parameters (`param_names` in the groups and in state_dict, loading named into
unnamed and back, torch.distributed.checkpoint's state-dict helpers, the paper's torch.optim loader), keys of
`optimizer.state` that are no parameter's, the load_state_dict hooks, every one-element tensor lr, and torch.optim's
error wording. The one deliberate difference (a tensor listed twice in a group) is pinned as recorded in
registry.KNOWN_DIFFERENCES.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from conftest import FAST_VARIANTS, VARIANTS, bitwise_equal, make_params, train
from registry import KNOWN_DIFFERENCES

NAMES = ["0.weight", "0.bias", "1.weight", "1.bias"]


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def _fit(model, opt, calls=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(calls):
        opt.zero_grad()
        model(torch.randn(5, 3, generator=gen)).pow(2).sum().backward()
        opt.step()


def _params(model, named):
    return model.named_parameters() if named else model.parameters()


def _outcome(fn):
    """(exception type, message) of fn(), or None."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 (compared as data)
        return type(e), str(e)
    return None


# ------------------------------------------------------------------------------------------- named parameters


@pytest.mark.parametrize("named_first,named_second", [(True, True), (True, False), (False, True), (False, False)])
def test_named_state_dict_loads_like_torch_optim(fast_variant, named_first, named_second):
    """param_names in the groups and in state_dict, and what survives a load, exactly as with AdamW; named or not,
    the run is the same."""
    seen = {}
    for name, factory in (("torch", torch.optim.AdamW), ("ours", fast_variant)):
        model = _model()
        opt = factory(_params(model, named_first))
        _fit(model, opt)
        sd = copy.deepcopy(opt.state_dict())
        opt2 = factory(_params(model, named_second))
        opt2.load_state_dict(sd)
        seen[name] = ([g.get("param_names") for g in opt.param_groups], [g.get("param_names") for g in sd["param_groups"]],
                      [g.get("param_names") for g in opt2.param_groups],
                      [g.get("param_names") for g in opt2.state_dict()["param_groups"]])
    assert seen["ours"] == seen["torch"]
    assert seen["ours"][2] == [NAMES if named_first or named_second else None]


def test_named_parameters_step_like_unnamed_ones(fast_variant):
    a, b = _model(), _model()
    _fit(a, fast_variant(a.named_parameters()), calls=5)
    _fit(b, fast_variant(b.parameters()), calls=5)
    assert bitwise_equal(list(a.parameters()), list(b.parameters()))


def test_named_param_groups_and_their_errors_match_torch_optim(fast_variant):
    model = _model()
    groups = lambda: [{"params": list(model[0].named_parameters()), "weight_decay": 0.0},  # noqa: E731
                      {"params": list(model[1].named_parameters())}]
    ours, theirs = fast_variant(groups()), torch.optim.AdamW(groups())
    assert [g["param_names"] for g in ours.param_groups] == [g["param_names"] for g in theirs.param_groups]
    w, w2 = model[0].weight, model[1].weight
    for bad in ([("weight", w), w2],  # some names missing
                [{"params": [w]}, {"params": [("weight", w2)]}]):  # a named group after an unnamed one
        expected = _outcome(lambda: torch.optim.AdamW(bad))
        assert expected is not None and _outcome(lambda: fast_variant(bad)) == expected


def test_dcp_state_dict_helpers_with_named_parameters(fast_variant):
    """torch.distributed.checkpoint's get/set_optimizer_state_dict (FQN keys, in one process): named or unnamed on
    either side, the state arrives and the names are AdamW's."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    for named_first, named_second in ((True, False), (False, True), (True, True)):
        model = _model()
        opt = fast_variant(_params(model, named_first))
        _fit(model, opt)
        sd = get_optimizer_state_dict(model, opt)
        opt2 = fast_variant(_params(model, named_second))
        set_optimizer_state_dict(model, opt2, sd)
        assert [int(opt2.state[p]["step"]) for p in model.parameters()] == [2] * 4
        assert opt2.param_groups[0]["param_names"] == NAMES


def test_named_checkpoint_and_the_papers_torch_optim_loader(fast_variant):
    """The paper's optimizer is a torch.optim.Optimizer: its loader takes our named checkpoint (names kept), and a
    checkpoint it wrote with names loads into ours."""
    model = _model()
    opt = fast_variant(model.named_parameters())
    _fit(model, opt)
    sd = copy.deepcopy(opt.state_dict())
    paper = torch.optim.SGD(model.parameters(), lr=0.1)  # stands for soap.py: its loader is torch.optim's
    torch.optim.Optimizer.load_state_dict(paper, sd)
    assert paper.param_groups[0]["param_names"] == NAMES
    assert paper.state[model[0].weight]["step"] == 2
    written = torch.optim.Optimizer.state_dict(paper)  # the paper's save is torch.optim's too
    again = fast_variant(model.parameters())
    again.load_state_dict(written)
    assert again.param_groups[0]["param_names"] == NAMES and int(again.state[model[0].weight]["step"]) == 2


# ------------------------------------------------------------------------------------ keys that are no parameter's


def test_any_key_in_state_survives_like_torch_optim(variant):
    model, reference = _model(), _model()
    opt, plain = variant(model.parameters()), variant(reference.parameters())
    _fit(model, opt)
    _fit(reference, plain)
    witness = torch.optim.AdamW(_model().parameters())
    for o in (opt, witness):
        o.state["test"] = 1
        o.state[("a", "tuple")] = {"nested": [1, 2]}
    sd, sd_witness = opt.state_dict(), witness.state_dict()
    extra = lambda d: {k: v for k, v in d["state"].items() if not isinstance(k, int)}  # noqa: E731
    assert extra(sd) == extra(sd_witness) == {"test": 1, ("a", "tuple"): {"nested": [1, 2]}}
    loaded = variant(_model().parameters())
    loaded.load_state_dict(copy.deepcopy(sd))
    assert loaded.state["test"] == 1 and copy.deepcopy(loaded).state["test"] == 1
    _fit(model, opt, calls=4, seed=2)  # the extra keys change nothing
    _fit(reference, plain, calls=4, seed=2)
    assert bitwise_equal(list(model.parameters()), list(reference.parameters()))


def test_load_state_dict_hooks_as_torch_optim(fast_variant):
    """A pre hook's returned dict is what is loaded, a post hook runs after it and may write any key into state
    (what torch's suite checks with an lr mark that happens to be SOAP's default, 0.003)."""
    def pre(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["lr"] = 0.25
        return state_dict

    def post(optimizer):
        optimizer.state["lr_after_load"] = optimizer.param_groups[0]["lr"]

    results = []
    for factory in (torch.optim.AdamW, fast_variant):
        opt = factory(_model().parameters(), lr=0.5)
        opt.register_load_state_dict_pre_hook(pre)
        opt.register_load_state_dict_post_hook(post)
        opt.load_state_dict(opt.state_dict())
        results.append((opt.param_groups[0]["lr"], opt.state["lr_after_load"]))
    assert results[0] == results[1] == (0.25, 0.25)


# ------------------------------------------------------------------------------------------------- tensor lr


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_every_one_element_tensor_lr(variant, shape):
    """torch.optim accepts a one-element lr of any shape; so do both classes, and the run is the float-lr run."""
    shapes = [(4, 3), (5,)]
    with_tensor, with_float = make_params(shapes), make_params(shapes)
    train(variant(with_tensor, lr=torch.full(shape, 0.01), precondition_frequency=2), with_tensor, 6)
    train(variant(with_float, lr=0.01, precondition_frequency=2), with_float, 6)
    for a, b in zip(with_tensor, with_float):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------ errors and wording


@pytest.mark.parametrize("case", ["two-element lr", "a set of parameters", "not a tensor", "negative lr",
                                  "negative eps", "beta1 of 1", "negative weight_decay", "in two groups"])
def test_errors_read_like_torch_optim(fast_variant, case):
    p, q = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    args = {
        "two-element lr": ([p], {"lr": torch.tensor([1e-3, 1e-3])}),
        "a set of parameters": ([{"params": {p}}], {}),
        "not a tensor": ([p, "weight"], {}),
        "negative lr": ([p], {"lr": -1.0}),
        "negative eps": ([p], {"eps": -1.0}),
        "beta1 of 1": ([p], {"betas": (1.0, 0.5)}),
        "negative weight_decay": ([p], {"weight_decay": -1.0}),
        "in two groups": ([{"params": [p]}, {"params": [p, q]}], {}),
    }[case]
    expected = _outcome(lambda: torch.optim.AdamW(args[0], **args[1]))
    got = _outcome(lambda: fast_variant(args[0], **args[1]))
    assert expected is not None and got is not None and got[0] is expected[0]
    assert got[1].startswith(expected[1].split(":")[0]), (got, expected)  # torch's wording, then our detail


def test_a_tensor_listed_twice_is_the_recorded_difference(fast_variant):
    """torch.optim warns; we raise (registry.KNOWN_DIFFERENCES says why)."""
    p = torch.nn.Parameter(torch.ones(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.optim.AdamW([p, p])
    assert any("duplicate parameters" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="is the same tensor"):
        fast_variant([p, p])
    assert "duplicate parameter in a param group" in KNOWN_DIFFERENCES


def test_registry_variants_are_the_default_ones():
    assert set(VARIANTS) == {"soap", "stacked-eager", "aot-eager"} and set(FAST_VARIANTS) <= set(VARIANTS)
