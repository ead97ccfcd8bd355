"""Parameters and gradients live in their bucket slots (issue 17): no copies per step, nothing lost by serializers.

Independent checks: copies are counted by logging every aten op the step receives a parameter or gradient in
(a TorchDispatchMode, outside the implementation); training is compared with the reference `SOAP`; files are
compared with what a model never touched by CompiledSOAP writes.
"""

from __future__ import annotations

import functools
import io
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import relative_deviation
from compiled_soap import SOAP, CompiledSOAP

EAGER = functools.partial(CompiledSOAP, compile=False)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 5)
        self.b = torch.nn.Linear(5, 5)
        self.c = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _batch(t):
    gen = torch.Generator().manual_seed(1000 + t)
    return torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)


def _train(factory, steps=7, set_to_none=True, accumulate=1, clip=False, scaler=False, hook=None, step=None,
           model=None, **kw):
    """`hook(model, opt, t)` runs before each step; `step(model, opt, t)` replaces opt.step()."""
    torch.manual_seed(0)
    model = _Net() if model is None else model
    opt = factory(model.parameters(), lr=1e-2, precondition_frequency=3, **kw)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=256.0) if scaler else None
    for t in range(steps):
        for micro in range(accumulate):
            x, y = _batch(t * accumulate + micro)
            loss = torch.nn.functional.mse_loss(model(x), y)
            (grad_scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            grad_scaler.unscale_(opt)
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        if hook is not None:
            hook(model, opt, t)
        if scaler:
            grad_scaler.step(opt)
            grad_scaler.update()
        elif step is not None:
            step(model, opt, t)
        else:
            opt.step()
        opt.zero_grad(set_to_none=set_to_none)
    return model, opt


class _Log(TorchDispatchMode):
    """Every aten op called with one of `watched` (by identity) as an argument."""

    def __init__(self, watched):
        super().__init__()
        self.ids, self.hits = {id(t) for t in watched}, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(id(a) in self.ids for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)):
            self.hits.append(str(func))
        return func(*args, **(kwargs or {}))


def _ops_touching_params_and_grads(model, opt):
    watched = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    with _Log(watched) as log:
        opt.step()
    return log.hits


@pytest.mark.parametrize("set_to_none", [True, False])
def test_step_copies_no_parameter_and_no_gradient(set_to_none):
    seen = []
    _train(EAGER, steps=6, set_to_none=set_to_none,
           step=lambda m, o, t: seen.append(_ops_touching_params_and_grads(m, o)) if t >= 2 else o.step())
    assert seen and all(hits == [] for hits in seen), seen


def test_separate_storage_copies_at_every_step():
    """The check above can fail: the old layout (storage="separate") copies both in and the parameters out."""
    seen = []
    _train(functools.partial(EAGER, storage="separate"), steps=4,
           step=lambda m, o, t: seen.append(_ops_touching_params_and_grads(m, o)) if t >= 2 else o.step())
    assert all(sum("copy" in h for h in hits) >= 3 for hits in seen), seen


def test_backward_copies_each_fresh_gradient_once_and_accumulates_in_place():
    model, opt = _train(EAGER, steps=3)
    params = list(model.parameters())
    x, y = _batch(50)

    class _Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func is torch.ops.aten.copy_.default
            return func(*args, **(kwargs or {}))

    with _Copies() as fresh:
        torch.nn.functional.mse_loss(model(x), y).backward()  # every .grad was None: one copy each, into its slot
    slots = [p.grad for p in params]
    with _Copies() as accumulated:
        torch.nn.functional.mse_loss(model(x), y).backward()  # adds in place into the slots
    assert fresh.n == len(params) and accumulated.n == 0
    assert all(p.grad is s for p, s in zip(params, slots))


def test_parameters_live_in_slots_with_storages_of_their_own():
    model, opt = _train(EAGER, steps=2)
    params = list(model.parameters())
    starts = {p.untyped_storage().data_ptr() for p in params}
    assert len(starts) == len(params)
    assert all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in params)
    stacked = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
               for b in opt._owner.buckets for t in (b.tensors.params,)}
    inside = [any(s <= p.data_ptr() < s + n for s, n in stacked.items()) for p in params]
    assert all(inside)


@pytest.mark.parametrize("kw", [{}, {"clip": True}, {"accumulate": 2, "set_to_none": False}, {"scaler": True}],
                         ids=["plain", "clip", "accumulate", "grad-scaler"])
def test_training_loops_match_reference(kw):
    ref, _ = _train(SOAP, **kw)
    got, _ = _train(EAGER, **kw)
    start = [p.detach().clone() for p in _train(SOAP, steps=0)[0].parameters()]
    assert relative_deviation(list(got.parameters()), list(ref.parameters()), start) < 1e-5


def test_bucket_and_separate_storage_are_bitwise_equal():
    a, _ = _train(EAGER)
    b, _ = _train(functools.partial(EAGER, storage="separate"))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_parameter_whose_memory_is_seen_elsewhere_stays_put():
    """A view of the weight held by the user keeps seeing the weight: the parameter is left where it is."""
    held = {}

    def hold(model, opt, t):
        if t == 0:
            held["view"] = model.b.weight.detach()[0]

    model, _ = _train(EAGER, hook=hold)
    ref, _ = _train(SOAP)
    assert torch.equal(held["view"], model.b.weight.detach()[0])
    assert torch.allclose(model.b.weight, ref.b.weight, rtol=1e-5, atol=1e-6)


def test_in_place_edit_through_data_is_seen():
    """`p.data.mul_()` between steps (pruning masks, clamps) edits the slot itself: nothing is overwritten."""
    def edit(model, opt, t):
        opt.step()
        model.a.weight.data.clamp_(-0.05, 0.05)

    got, _ = _train(EAGER, step=edit)
    ref, _ = _train(SOAP, step=edit)
    assert torch.allclose(got.a.weight, ref.a.weight, rtol=1e-5, atol=1e-6)
    assert float(got.a.weight.abs().max()) <= 0.05 + 1e-6


def test_step_between_forward_and_backward_raises_like_torch_optim():
    """Updating a parameter in place bumps its version, so autograd refuses a stale graph (as with SGD)."""
    for factory in (torch.optim.SGD, EAGER):
        model = _Net()
        opt = factory(model.parameters(), lr=1e-2)
        for _ in range(3):
            x, y = _batch(0)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        x, y = _batch(1)
        loss = torch.nn.functional.mse_loss(model(x), y)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_load_state_dict_assign_behaves_as_reference():
    def assign(model, opt, t):
        if t == 3:
            model.load_state_dict({k: v.clone() * 0.5 for k, v in model.state_dict().items()}, assign=True)

    got, _ = _train(EAGER, hook=assign)
    ref, _ = _train(SOAP, hook=assign)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(got.parameters(), ref.parameters()))


def test_tied_weights():
    def run(factory):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(7, 4)
        head = torch.nn.Linear(4, 7, bias=False)
        head.weight = emb.weight
        opt = factory(list({id(p): p for p in [*emb.parameters(), *head.parameters()]}.values()),
                      precondition_frequency=2)
        for t in range(6):
            ids = torch.arange(7) % (t + 2)
            torch.nn.functional.cross_entropy(head(emb(ids)), ids).backward()
            opt.step()
            opt.zero_grad()
        return emb.weight, head.weight

    (a, b), (c, d) = run(EAGER), run(SOAP)
    assert a is b and torch.allclose(a, c, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ serializers


def _trained():
    model, opt = _train(EAGER, steps=2)
    fresh = _Net()
    fresh.load_state_dict(model.state_dict())  # the same values in storages of their own
    return model, fresh


def _size(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return len(buf.getvalue())


def test_torch_save_of_one_layer_and_of_the_model_write_what_they_hold():
    model, fresh = _trained()
    assert _size(model.b.state_dict()) == _size(fresh.b.state_dict())
    assert _size(model.state_dict()) == _size(fresh.state_dict())
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), model.parameters()))


def test_safetensors_round_trip(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    model, fresh = _trained()
    st.save_model(model, str(tmp_path / "m.safetensors"))
    st.save_model(fresh, str(tmp_path / "f.safetensors"))
    assert os.path.getsize(tmp_path / "m.safetensors") == os.path.getsize(tmp_path / "f.safetensors")
    back = _Net()
    st.load_model(back, str(tmp_path / "m.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(back.parameters(), model.parameters()))


def test_accelerate_state_dict_cleaning_drops_nothing():
    utils = pytest.importorskip("accelerate.utils")
    model, _ = _trained()
    cleaned = utils.other.clean_state_dict_for_safetensors(dict(model.state_dict()))
    assert set(cleaned) == set(model.state_dict())


def test_distributed_checkpoint_of_the_model(tmp_path):
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    model, _ = _trained()
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path))
    back = _Net()
    sd = back.state_dict()
    dcp.load(sd, checkpoint_id=str(tmp_path))
    back.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(back.parameters(), model.parameters()))


def test_hugging_face_save_pretrained_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    opt = EAGER(model.parameters(), lr=1e-2, precondition_frequency=2)
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path / "m")
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "m")
    sd, bsd = model.state_dict(), back.state_dict()
    assert set(sd) == set(bsd) and all(torch.equal(sd[k], bsd[k]) for k in sd)


@pytest.mark.compile
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_model_compiled_with_torch_compile_whose_parameters_moved(mode):
    """The model's own compiled graphs read the parameters where they live after moving into their slots (first
    step) and after moving again (`p.data = ...` at call 4): bitwise what the same compiled model gives with the
    parameters left in their own memory (storage="separate"), and close to the eager model under SOAP (Inductor's
    fused forward and backward round differently from eager)."""
    def move(model, opt, t):
        if t == 4:
            model.b.weight.data = model.b.weight.data.clone()

    def run(storage):
        torch.manual_seed(0)
        return _train(functools.partial(EAGER, storage=storage), hook=move, model=torch.compile(_Net(), mode=mode))[0]

    got, control = run("bucket"), run("separate")
    assert all(torch.equal(a, b) for a, b in zip(got.parameters(), control.parameters()))
    ref, _ = _train(SOAP, hook=move)
    start = [p.detach().clone() for p in _train(SOAP, steps=0)[0].parameters()]
    assert relative_deviation(list(got.parameters()), list(ref.parameters()), start) < 1e-3
