"""Contracts around the reference `SOAP`: the hyperparameters defined once, the checkpoint module's helpers, and the
parts of SOAP's Optimizer behaviour that are not math (zero-size parameters, copies, paper-layout checkpoints).

Expected values are written out here (the spec's defaults, hand-made checkpoints), never taken from the module
under test.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import os
import sys
import pickle
import re

import numpy as np
import pytest
import torch

from compiled_soap import SOAP, CompiledSOAP
from compiled_soap import hyperparameters as hp
from compiled_soap.checkpoint import saved_entry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32, F64 = torch.float32, torch.float64

# docs/spec.md §1, written out: the paper's constructor.
SPEC_DEFAULTS = [
    ("lr", 3e-3), ("betas", (0.95, 0.95)), ("shampoo_beta", -1), ("eps", 1e-8), ("weight_decay", 0.01),
    ("precondition_frequency", 10), ("max_precond_dim", 10000), ("merge_dims", False), ("precondition_1d", False),
    ("normalize_grads", False), ("data_format", "channels_first"), ("correct_bias", True),
]


def randn(shape, seed, dtype=F32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64).to(dtype)


# ----------------------------------------------------------------------------------------------------- hyperparameters


def test_hyperparameters_defined_once_in_constructor_order():
    assert [(h.name, h.default) for h in hp.HYPERPARAMETERS] == SPEC_DEFAULTS
    assert all(type(h.default) is type(d) for h, (_, d) in zip(hp.HYPERPARAMETERS, SPEC_DEFAULTS))
    assert list(hp.DEFAULTS.items()) == SPEC_DEFAULTS
    assert all(isinstance(h, hp.Hyperparameter) and h._fields == ("name", "default", "check", "doc") and h.doc
               for h in hp.HYPERPARAMETERS)
    for h in hp.HYPERPARAMETERS:
        h.check(h.default)  # every default passes its own check


@pytest.mark.parametrize("cls", [SOAP, CompiledSOAP], ids=["SOAP", "CompiledSOAP"])
def test_constructor_signature_uses_the_defaults(cls):
    """The constructor's arguments after `params` are the hyperparameters, in order, with the defaults of DEFAULTS
    (CompiledSOAP's own options come after them, keyword-only)."""
    parameters = list(inspect.signature(cls.__init__).parameters.values())
    assert [p.name for p in parameters[:2]] == ["self", "params"]
    positional = [p for p in parameters[2:] if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert [(p.name, p.default) for p in positional] == list(hp.DEFAULTS.items())
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters[2 + len(positional):])
    opt = cls([torch.nn.Parameter(torch.zeros(2, 2))], **({} if cls is SOAP else {"compile": False}))
    assert opt.defaults == hp.DEFAULTS


def test_checked_defaults_takes_the_hyperparameters_from_locals():
    args = {"self": object(), "params": [], "compile": True, **hp.DEFAULTS, "lr": np.float32(0.5)}
    out = hp.checked_defaults(args)
    assert list(out) == [name for name, _ in SPEC_DEFAULTS] and out["lr"] == np.float32(0.5)
    with pytest.raises(ValueError, match=r"Invalid epsilon value: 0"):
        hp.checked_defaults({**args, "eps": 0})


def test_first_bad_hyperparameter_in_constructor_order_is_named():
    group = {**hp.DEFAULTS, "betas": (1.0, 0.5), "eps": -1.0, "correct_bias": "yes"}
    with pytest.raises(ValueError, match=r"^Invalid beta parameter at index 0: 1.0 \(betas=\(1.0, 0.5\); each must be in \[0, 1\)\)$"):
        hp.validate_hyperparameters(group)
    with pytest.raises(ValueError, match=r"^Invalid epsilon value: -1.0 \(eps must be a finite number > 0\)$"):
        hp.validate_hyperparameters({**group, "betas": (0.9, 0.9)})
    with pytest.raises(ValueError, match=r"^Invalid correct_bias: 'yes' \(must be a bool\)$"):
        hp.validate_hyperparameters({**group, "betas": (0.9, 0.9), "eps": 1e-8})


@pytest.mark.parametrize("name,value", [
    ("lr", np.float32(3e-3)), ("lr", np.int64(0)), ("lr", torch.tensor(1e-3)), ("lr", torch.tensor([1e-3])),
    ("betas", (np.float64(0.9), 0.95)), ("betas", [0.0, np.float32(0.5)]), ("shampoo_beta", np.float64(-1.0)),
    ("eps", np.float16(1e-3)), ("weight_decay", np.int8(0)), ("precondition_frequency", np.int64(10)),
    ("precondition_frequency", np.uint8(3)), ("max_precond_dim", np.int64(4096)), ("merge_dims", np.bool_(True)),
])
def test_numpy_scalars_and_tensor_lr_accepted(name, value):
    hp.validate_hyperparameters({**hp.DEFAULTS, name: value})
    SOAP([torch.nn.Parameter(torch.zeros(2))], **{name: value})


def test_duplicate_in_a_group_message():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    group = {"params": (x for x in [a, b, b, a])}  # a generator: consumed once, kept as a list
    with pytest.raises(ValueError, match=r"^parameter at positions 1 and 2 of a param group is the same tensor "):
        hp.validate_param_group(group, hp.DEFAULTS)
    group = {"params": (x for x in [a, b])}
    hp.validate_param_group(group, hp.DEFAULTS)
    assert group["params"] == [a, b]


def test_readme_holds_the_generated_table():
    """README.md's "## Hyperparameters" section comes right after "## Use it in your training loop" and holds
    exactly markdown_table(), whose rows are the hyperparameters in order."""
    table = hp.markdown_table()
    lines = table.splitlines()
    assert lines[:2] == ["| name | default | meaning |", "|---|---|---|"]
    assert [re.match(r"\| `(\w+)` \| `([^`]+)` \| .+ \|$", line).groups() for line in lines[2:]] == \
        [(name, repr(default)) for name, default in SPEC_DEFAULTS]
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    headings = re.findall(r"^## (.+)$", readme, flags=re.M)
    assert headings[headings.index("Use it in your training loop") + 1] == "Hyperparameters"
    section = readme.split("\n## Hyperparameters\n", 1)[1].split("\n## ", 1)[0]
    table_lines = [line for line in section.splitlines() if line.startswith("|")]
    assert "\n".join(table_lines) + "\n" == table
    assert "\n" + table in section


def test_bench_takes_the_default_period_from_defaults(monkeypatch):
    """profiling/bench.py amortizes to DEFAULTS["precondition_frequency"], whatever it is."""
    monkeypatch.setitem(hp.DEFAULTS, "precondition_frequency", 7)
    monkeypatch.delitem(sys.modules, "profiling.bench", raising=False)
    bench = importlib.import_module("profiling.bench")
    assert bench.AMORTIZE_PERIOD == 7


# --------------------------------------------------------------------------------------------------- checkpoint helpers


def test_saved_entry_converts_the_in_memory_form():
    base = torch.arange(24, dtype=F32).reshape(2, 3, 4)
    q = torch.linalg.qr(randn((3, 3), 1))[0]  # column-major, as QR returns it
    entry = {
        "step": torch.tensor(5), "exp_avg": base[1, :, 1:], "exp_avg_sq": base[0].T, "GG": [None, torch.eye(3)],
        "Q": [None, q], "precondition_frequency": np.int64(3), "shampoo_beta": torch.tensor(0.5, dtype=F64),
        "skipped": torch.tensor(1), "refresh_clock": 6, "ignored": "not saved",
    }
    saved = saved_entry(entry)
    assert list(saved) == ["step", "exp_avg", "exp_avg_sq", "GG", "Q", "precondition_frequency", "shampoo_beta",
                           "skipped", "refresh_clock"]
    assert [type(saved[k]) for k in ("step", "precondition_frequency", "shampoo_beta", "skipped", "refresh_clock")] \
        == [int, int, float, int, int]
    assert (saved["step"], saved["precondition_frequency"], saved["shampoo_beta"], saved["skipped"],
            saved["refresh_clock"]) == (5, 3, 0.5, 1, 6)
    for key, source in (("exp_avg", base[1, :, 1:]), ("exp_avg_sq", base[0].T)):
        assert saved[key].is_contiguous() and torch.equal(saved[key], source)
        assert saved[key].untyped_storage().nbytes() == source.numel() * 4  # its own storage, not the stacked one
    assert saved["GG"][0] == [] and saved["Q"][0] == []
    assert torch.equal(saved["Q"][1], q) and saved["Q"][1].stride() == q.stride()  # layout kept (see checkpoint.py)
    assert saved["Q"][1].data_ptr() != q.data_ptr()
    assert saved_entry({"skipped": torch.tensor(2)}) == {"skipped": 2}


# ----------------------------------------------------------------------------------------------------- SOAP specifics

ZERO_SIZE = [((0, 5), {}), ((0,), {}), ((0,), dict(precondition_1d=True)), ((3, 0, 2), {}),
             ((0, 5), dict(merge_dims=True)), ((2, 0, 3, 3), dict(merge_dims=True, data_format="channels_last"))]


@pytest.mark.parametrize("shape,kw", ZERO_SIZE, ids=[f"{s}-{'-'.join(kw) or 'plain'}" for s, kw in ZERO_SIZE])
def test_zero_size_parameter(shape, kw):
    """A parameter with no elements steps, checkpoints and resumes, and changes nothing for its neighbour."""
    empty, other = torch.nn.Parameter(torch.zeros(shape)), torch.nn.Parameter(randn((4, 3), 1))
    alone = torch.nn.Parameter(randn((4, 3), 1))
    opt = SOAP([empty, other], lr=0.05, precondition_frequency=2, **kw)
    control = SOAP([alone], lr=0.05, precondition_frequency=2, **kw)
    for call in range(5):
        empty.grad = torch.zeros(shape)
        other.grad = alone.grad = randn((4, 3), 10 + call)
        opt.step()
        control.step()
    assert torch.equal(other, alone)
    s = opt.state[empty]
    assert s["step"] == 4 and s["refresh_clock"] == 4 and s["exp_avg"].shape == shape
    sd = copy.deepcopy(opt.state_dict())
    resumed = SOAP([torch.nn.Parameter(torch.zeros(shape)), torch.nn.Parameter(other.detach().clone())], lr=0.05,
                   precondition_frequency=2, **kw)
    resumed.load_state_dict(sd)
    new_empty, new_other = resumed.param_groups[0]["params"]
    for call in range(5, 8):
        new_empty.grad = empty.grad = torch.zeros(shape)
        new_other.grad = other.grad = randn((4, 3), 10 + call)
        opt.step()
        resumed.step()
    assert torch.equal(new_other, other) and resumed.state[new_empty]["step"] == 7


def test_paper_layout_checkpoint_with_a_zero_length_axis_loads():
    """The paper's soap.py keeps a 0x0 GG for a zero-length axis and writes [] for its Q (its eigh helper skips any
    empty factor); such a checkpoint (version 0) loads."""
    p = torch.nn.Parameter(torch.zeros(0, 5))
    g5 = randn((5, 5), 3)
    paper_state = {
        "step": 2, "exp_avg": torch.zeros(0, 5), "exp_avg_sq": torch.zeros(0, 5),
        "GG": [torch.zeros(0, 0), g5 @ g5.T], "Q": [[], torch.linalg.qr(g5)[0]],
        "precondition_frequency": 10, "shampoo_beta": 0.95,
    }
    groups = [{k: v for k, v in hp.DEFAULTS.items() if k != "data_format"} | {"params": [0]}]
    opt = SOAP([p])
    opt.load_state_dict({"state": {0: paper_state}, "param_groups": groups})
    s = opt.state[p]
    assert [m.shape for m in s["GG"]] == [(0, 0), (5, 5)] and [m.shape for m in s["Q"]] == [(0, 0), (5, 5)]
    assert (s["step"], s["refresh_clock"], s["skipped"]) == (2, 2, 0)
    assert opt.param_groups[0]["data_format"] == "channels_first"  # not in the paper's groups: kept from ours
    p.grad = torch.zeros(0, 5)
    opt.step()
    assert s["step"] == 3


def test_paper_layout_group_without_data_format_keeps_ours():
    """The paper's optimizer keeps data_format outside its param groups: loading its checkpoint keeps the value this
    optimizer was built with (which matters for channels_last merge_dims)."""
    shape = (2, 3, 3, 4)
    p = torch.nn.Parameter(randn(shape, 4))
    src = SOAP([p], merge_dims=True, max_precond_dim=12, data_format="channels_last")
    p.grad = randn(shape, 5)
    src.step()
    sd = copy.deepcopy(src.state_dict())
    del sd["format_version"]
    del sd["param_groups"][0]["data_format"]
    for s in sd["state"].values():
        del s["skipped"], s["refresh_clock"]
    q = torch.nn.Parameter(p.detach().clone())
    dst = SOAP([q], merge_dims=True, max_precond_dim=12, data_format="channels_last")
    dst.load_state_dict(sd)
    assert dst.param_groups[0]["data_format"] == "channels_last"
    for opt, x in ((src, p), (dst, q)):
        x.grad = randn(shape, 6)
        opt.step()
    assert torch.equal(p, q)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_continues_identically(how):
    """A deep copy or a pickle round trip of a trained SOAP (a skipped call included, so the clock is ahead of the
    step) continues exactly like the original; the copy has its own parameters and the same defaults."""
    params = [torch.nn.Parameter(randn(s, i)) for i, s in enumerate([(4, 3), (5,), (2, 3, 2)])]
    opt = SOAP([{"params": params[:2]}, {"params": params[2:], "lr": 0.01}], lr=0.02, precondition_frequency=2,
               precondition_1d=True)
    for call in range(4):
        for i, p in enumerate(params):
            p.grad = randn(p.shape, 100 + 10 * call + i)
        if call == 2:
            params[0].grad[0, 0] = float("nan")
        opt.step()
    dup = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    dparams = [p for g in dup.param_groups for p in g["params"]]
    assert all(a is not b and torch.equal(a, b) for a, b in zip(dparams, params))
    assert dup.defaults == opt.defaults and "differentiable" not in dup.defaults
    assert dup.state[dparams[0]]["refresh_clock"] == 3 and dup.state[dparams[0]]["step"] == 2
    for call in range(4, 9):
        for i, (p, d) in enumerate(zip(params, dparams)):
            p.grad = randn(p.shape, 100 + 10 * call + i)
            d.grad = p.grad.clone()
        opt.step()
        dup.step()
        for p, d in zip(params, dparams):
            assert torch.equal(p, d), call
    for p, d in zip(params, dparams):
        sa, sb = opt.state[p], dup.state[d]
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert torch.equal(sa[k], sb[k])
            elif isinstance(sa[k], list):
                assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(sa[k], sb[k]))
            else:
                assert sa[k] == sb[k]
    # a new group after the copy gets exactly the defaults (no extra key from torch.optim's __setstate__)
    dup.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    assert set(dup.param_groups[-1]) == {"params", *hp.DEFAULTS}
