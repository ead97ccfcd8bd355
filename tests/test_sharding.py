"""Sharded CompiledSOAP (docs/distributed.md): each parameter owned by one rank, state and step on the owner only.

Spawned gloo runs on 127.0.0.1 (2 and 4 ranks), under DDP (replicated parameters) and FSDP2 (DTensor parameters
sharded on dim 0, with uneven row counts), compared with an independent single-process CompiledSOAP fed the
averaged gradients the ranks saw. The model is float64 with odd layer sizes, so classes do not split evenly and
FSDP2's last ranks get short or empty shards. The ranks stack other buckets than the single process (their owned
parameters only), so the runs compare within tests/agreement.py's float64 rounding bound, and the tests print
whether they were in fact bitwise. Between ranks of one run, bitwise. The layers are not square: every run's
initialising call gets integer-valued gradients, so that all start from the same eigenbases (`_integer_grads`).

Checkpoints: a sharded run at world size 2 saves a consolidated state_dict (torch.save) and a DCP checkpoint of the
model and the optimizer (get_optimizer_state_dict, flattened through `factors_as_dicts`); runs at world size 1 and
4 load each and must continue like the uninterrupted run: within the same bound, since another world size stacks
other buckets, while a control that loads no optimizer state is far outside it.
"""

from __future__ import annotations

import copy
import os
import random

import pytest
import torch
import torch.distributed as dist

from compiled_soap import SOAP, CompiledSOAP, factors_as_dicts, merge_state_dicts
from compiled_soap.ownership import assign_owners, item_flops, state_bytes
from tests.agreement import agree
from tests.graph_checks import HostReadLog
from tests.spawning import COLLECTIVE_TIMEOUT as TIMEOUT, SPAWN_DEADLINE_S, spawn_with_deadline

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

SIZES = [6, 5, 7, 6]  # Linear(6, 5), Linear(5, 7), Linear(7, 6): weights 5x6, 7x5, 6x7 and three biases
BATCH = 32
CALLS, BEFORE = 7, 4  # precondition_frequency 3: refreshes inside both halves
HYPER = {"precondition_frequency": 3, "compile": False}


def _model(sharded: str | None = None):
    torch.manual_seed(0)
    layers = []
    for a, b in zip(SIZES, SIZES[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers[:-1]).double()
    if sharded in ("fsdp", "hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # HSDP: replicated over mesh dimension 0 (pairs of ranks), sharded within each pair
        mesh = init_device_mesh("cpu", (dist.get_world_size() // 2, 2), mesh_dim_names=("replicate", "shard")) \
            if sharded == "hsdp" else None
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif sharded == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    return model


def _data():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(BATCH, SIZES[0], generator=gen, dtype=torch.float64),
            torch.randn(BATCH, SIZES[-1], generator=gen, dtype=torch.float64))


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _params(model):
    return [_full(p) for p in model.parameters()]


def _backward(model, rank, world):
    x, y = _data()
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    torch.nn.functional.mse_loss(model(x[rows]), y[rows]).backward()


def _init(rank, world, folder):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(folder, f"store{world}"), world), rank=rank,
                            world_size=world, timeout=TIMEOUT)
    torch.set_num_threads(1)


def _spawn(worker, folder, world, *args):
    """worker(rank, world, folder, *args) in `world` processes, ended after SPAWN_DEADLINE_S."""
    spawn_with_deadline(worker, (world, folder, *args), world, SPAWN_DEADLINE_S)


def _state_bytes_of(state_dict) -> int:
    leaves = torch.utils._pytree.tree_leaves(state_dict["state"])
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


TRACED = {"compile": True, "backend": "aot_eager"}  # the compiled step's graphs, traced (Inductor takes minutes here)


def _single_process(grads, state=None, params=None, **options):
    """An unsharded CompiledSOAP fed `grads` (one list per call); optionally from saved parameters and state."""
    model = _model()
    if params is not None:
        with torch.no_grad():
            for p, v in zip(model.parameters(), params):
                p.copy_(v)
    opt = CompiledSOAP(model.parameters(), **{**HYPER, **options})
    if state is not None:
        opt.load_state_dict(state)
    for call in grads:
        for p, g in zip(model.parameters(), call):
            p.grad = g.clone()
        opt.step()
    return _params(model), opt


# ------------------------------------------------------------------------------------------------------ planning


def test_owner_assignment_bound_and_stability():
    """Every rank's load, recomputed here from the owners, is at most the mean + the largest item (or the heaviest
    load before these items); every rank takes floor(n/W) of each class of n; and a few cases by hand."""
    rng = random.Random(0)
    for trial in range(200):
        world = rng.choice([2, 3, 4, 8])
        n_classes = rng.randint(1, 6)
        class_cost = [rng.choice([1.0, 3.5, 40.0, 1000.0 * rng.random()]) for _ in range(n_classes)]
        classes = [rng.randrange(n_classes) for _ in range(rng.randint(1, 40))]
        costs = [class_cost[c] for c in classes]
        before = [rng.choice([0.0, 0.0, 50.0]) for _ in range(world)]
        owners = assign_owners(costs, classes, world, before)
        loads = list(before)
        for i, r in enumerate(owners):
            assert 0 <= r < world
            loads[r] += costs[i]
        # List scheduling's bound: the last leftover item a rank took came when it was the least loaded (at most the
        # mean); a rank that took none holds its load before plus its even parts (at most total/W).
        bound = max(max(before) + sum(costs) / world, (sum(costs) + sum(before)) / world + max(costs))
        if not any(before):
            assert bound == sum(costs) / world + max(costs)
        assert max(loads) <= bound + 1e-9, (trial, loads, bound)
        for c in set(classes):  # every rank takes its even part of every class
            n = classes.count(c)
            counts = [sum(1 for i, r in enumerate(owners) if classes[i] == c and r == k) for k in range(world)]
            assert min(counts) >= n // world, (c, counts)
    assert assign_owners([5.0, 5.0, 1.0], ["a", "a", "b"], 2) == [0, 1, 0]
    assert assign_owners([5.0, 5.0, 1.0], ["a", "a", "b"], 2, loads=[0.0, 10.0]) == [0, 1, 0]
    assert assign_owners([5.0, 1.0], ["a", "b"], 2, loads=[0.0, 10.0]) == [0, 0]


def test_cost_model_by_hand():
    """item_flops and state_bytes against the cost model written out for a 5x6 weight and a 7-vector."""
    group = {"max_precond_dim": 10000, "merge_dims": False, "precondition_1d": False, "data_format": "channels_first",
             "precondition_frequency": 10}
    n = 30
    unit = 2 * 5 * n + 2 * 6 * n
    refresh = 2 * unit + (2 + 8 / 3) * (5 ** 3 + 6 ** 3)
    assert item_flops((5, 6), group) == pytest.approx(3 * unit + refresh / 10 + 20 * n)
    assert item_flops((7,), group) == pytest.approx(20 * 7)
    assert state_bytes((5, 6), torch.float32, group) == 4 * (2 * 30 + 2 * (25 + 36))
    assert state_bytes((5, 6), torch.float64, group) == 8 * (2 * 30 + 2 * (25 + 36))
    assert state_bytes((5, 6), torch.bfloat16, group) == 4 * (2 * 30 + 2 * (25 + 36))  # fp32 state
    assert state_bytes((7,), torch.float32, group) == 4 * 14


def test_shard_argument_checked():
    p = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="shard"):
        CompiledSOAP([p], shard="yes")
    opt = CompiledSOAP([p], shard=True, compile=False)
    p.grad = torch.randn(3, 3)
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        opt.step()


def _initialised_state_dict() -> dict:
    """The state_dict of an unsharded optimizer after one (initialising) call: every parameter has an entry."""
    model = _model()
    opt = CompiledSOAP(model.parameters(), **HYPER)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    return opt.state_dict()


def test_merge_state_dicts_refuses_an_entry_in_two_shards():
    full = _initialised_state_dict()
    halves = [{**full, "state": {k: v for k, v in full["state"].items() if k % 2 == r}} for r in range(2)]
    merged = merge_state_dicts(halves)
    assert sorted(merged["state"]) == sorted(full["state"])
    with pytest.raises(ValueError, match="two shards"):
        merge_state_dicts([full, halves[0]])


def test_loading_one_ranks_shard_elsewhere_warns():
    """A sharded state_dict holds one rank's parameters: loading it in one process (or on another rank layout)
    silently restarting the others would lose state, so it says so; a merged one loads quietly."""
    full = _initialised_state_dict()
    shard0, shard1 = ({**full, "state": {k: v for k, v in full["state"].items() if (k >= 3) == r},
                       "shard": {"rank": r, "world_size": 2}} for r in (0, 1))
    fresh = CompiledSOAP(_model().parameters(), **HYPER)
    with pytest.warns(UserWarning, match="rank 0 of 2: it holds that rank's parameters only"):
        fresh.load_state_dict(shard0)
    assert sorted(fresh.state_dict()["state"]) == [0, 1, 2]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(merge_state_dicts([shard0, shard1]))
    assert sorted(fresh.state_dict()["state"]) == sorted(full["state"])


# ------------------------------------------------------------------------------------------------------ training


def _train_worker(rank, world, folder, mode):
    _init(rank, world, folder)
    traced = mode.endswith("-traced")
    mode = mode.removesuffix("-traced")
    model = _model(mode if mode in ("fsdp", "hsdp") else "ddp")
    group = None
    if mode == "ddp-subgroup":  # HSDP-like: replicated over all ranks, SOAP's work sharded within pairs
        pairs = [dist.new_group([r, r + 1]) for r in range(0, world, 2)]
        group = pairs[rank // 2]
    opt = CompiledSOAP(model.parameters(), **{**HYPER, **(TRACED if traced else {})}, process_group=group)
    start = _params(model)
    grads, reads = [], []
    for call in range(CALLS):
        opt.zero_grad()
        _backward(model, rank, world)
        if call == 0:
            _set_grads(model, _integer_grads())
        grads.append([_full(p.grad) for p in model.parameters()])
        if call < 2:  # the initialisation call, and the set-up of the buckets' host mirror
            opt.step()
            continue
        with HostReadLog() as log:  # steady state: collectives and all, nothing read back from the device
            opt.step()
        reads += log.reads
    local = opt.state_dict()
    report = {"start": start, "grads": grads, "final": _params(model), "state_bytes": _state_bytes_of(local),
              "host_reads": reads,
              "owned": sorted(local["state"]), "shard": local.get("shard"),
              "flops": sum(item_flops(p.shape, opt.param_groups[0]) for i, p in enumerate(model.parameters())
                           if i in local["state"])}
    if mode == "fsdp" and world == 2:  # DTensor parameters: the reference and shard=False refuse them clearly
        for make in (lambda m=model: SOAP(m.parameters()),
                     lambda m=model: CompiledSOAP(m.parameters(), shard=False).step()):
            try:
                make()
            except ValueError as e:
                report.setdefault("dtensor_errors", []).append(str(e))
    if mode == "ddp" and world == 2:  # each rank its own parameter: same shapes, other values
        mine = torch.nn.Parameter(torch.full((3, 3), float(rank)))
        wrong = CompiledSOAP([mine], compile=False)
        mine.grad = torch.ones(3, 3)
        try:
            wrong.step()
        except ValueError as e:
            report["subset_error"] = str(e)
    report["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] if traced else None
    torch.save(report, os.path.join(folder, f"{mode}{'-traced' if traced else ''}{world}-rank{rank}.pt"))
    del model, opt
    dist.destroy_process_group()


@pytest.mark.parametrize("mode,world", [("ddp", 2), ("fsdp", 2), ("ddp", 4), ("fsdp", 4), ("ddp-subgroup", 4),
                                        ("hsdp", 4), ("fsdp-traced", 2)])
def test_sharded_training_equals_single_process(tmp_path, mode, world):
    _spawn(_train_worker, str(tmp_path), world, mode)
    reports = [torch.load(tmp_path / f"{mode}{world}-rank{r}.pt") for r in range(world)]
    for r in reports[1:]:  # every rank ends with the same full parameters, having seen the same averaged gradients
        assert all(torch.equal(a, b) for a, b in zip(r["final"], reports[0]["final"]))
        assert all(torch.equal(a, b) for call, other in zip(r["grads"], reports[0]["grads"]) for a, b in
                   zip(call, other))
    assert [r["host_reads"] for r in reports] == [[]] * world
    want, single = _single_process(reports[0]["grads"], **(TRACED if mode.endswith("-traced") else {}))
    print(mode, world, agree(reports[0]["final"], want, reports[0]["start"]))

    # Each parameter is owned by exactly one rank of its group; per rank, state bytes and FLOPs within the bound.
    if mode.endswith("-traced"):  # one plain and one refresh graph per rank, whatever the steps
        assert [r["graphs"] for r in reports] == [2] * world
    shard_world = 2 if mode in ("ddp-subgroup", "hsdp") else world
    per_group = [reports[g:g + shard_world] for g in range(0, world, shard_world)]
    full = single.state_dict()
    total_bytes, n_params = _state_bytes_of(full), len(full["state"])
    item_bytes = [_state_bytes_of({"state": {i: e}}) for i, e in full["state"].items()]
    shapes = [p.shape for p in single.param_groups[0]["params"]]
    item_cost = [item_flops(s, single.param_groups[0]) for s in shapes]
    for ranks in per_group:
        owned = sorted(i for r in ranks for i in r["owned"])
        assert owned == list(range(n_params))
        assert [(r["shard"]["rank"], r["shard"]["world_size"]) for r in ranks] == \
            [(k, shard_world) for k in range(shard_world)]
        for k, r in enumerate(ranks):  # the recorded owners say which entries each rank holds
            assert [i for i, o in enumerate(r["shard"]["owners"]) if o == k] == r["owned"]
        for r in ranks:
            assert r["state_bytes"] <= total_bytes / shard_world + max(item_bytes)
            assert r["flops"] <= sum(item_cost) / shard_world + max(item_cost)
        assert sum(r["state_bytes"] for r in ranks) == total_bytes
    if mode == "ddp" and world == 2:
        for r in reports:
            assert "shard=False" in r["subset_error"]
    if mode == "fsdp" and world == 2:
        for r in reports:
            assert len(r["dtensor_errors"]) == 2
            assert "use CompiledSOAP" in r["dtensor_errors"][0]
            assert "shard=False) cannot step DTensor" in r["dtensor_errors"][1]


# ------------------------------------------------------------------------------------------------------ resharding


def _dcp_state(model, opt):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, \
        get_optimizer_state_dict

    options = StateDictOptions(flatten_optimizer_state_dict=True)
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt, options=options)}


def _feed(model, first: bool = False) -> None:
    """Set every parameter's gradient to the full-batch gradient, computed on a plain replica of the model from
    the full parameters: the same gradients at every world size (an all-reduce of W partial gradients would round
    differently for each W), so resumed runs at other world sizes can be compared with the uninterrupted one.
    `first`: integer-valued gradients instead (a call where parameters initialise: see _integer_grads)."""
    if first:
        _set_grads(model, _integer_grads())
        return
    replica = _model()
    with torch.no_grad():
        for r, p in zip(replica.parameters(), model.parameters()):
            r.copy_(_full(p))
    _backward(replica, 0, 1)
    _set_grads(model, [r.grad for r in replica.parameters()])


def _integer_grads() -> list:
    """Full gradients for a call where parameters initialise. The layers are not square, so a first factor has a
    null space that eigh fills from its input's last bits (docs/spec.md trap 7); integer values make the Gram matrices
    exact in any kernel and bucket, so every run, sharded or not, starts from the same eigenbases
    (tests/agreement.py)."""
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(-3, 4, p.shape, generator=gen).double() for p in _model().parameters()]


def _set_grads(model, full_grads: list) -> None:
    for p, g in zip(model.parameters(), full_grads):
        if hasattr(p, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            p.grad = distribute_tensor(g, p.device_mesh, p.placements)
        else:
            p.grad = g


def _save_worker(rank, world, folder, mode):
    import torch.distributed.checkpoint as dcp

    _init(rank, world, folder)
    model = _model(mode)
    opt = CompiledSOAP(model.parameters(), **HYPER)
    opt.register_state_dict_post_hook(factors_as_dicts)
    for call in range(CALLS):
        if call == BEFORE:
            dcp.save(_dcp_state(model, opt), checkpoint_id=os.path.join(folder, "dcp"))
            saved = {"params": _params(model), "optim": opt.consolidated_state_dict()}  # collectives, all ranks
            if rank == 0:
                torch.save(saved, os.path.join(folder, "full.pt"))
        opt.zero_grad()
        _feed(model, first=call == 0)
        opt.step()
    final = _params(model)
    if rank == 0:
        torch.save(final, os.path.join(folder, "uninterrupted.pt"))
    del model, opt
    dist.destroy_process_group()


def _resume_worker(rank, world, folder, mode):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, \
        set_optimizer_state_dict

    _init(rank, world, folder)
    saved = torch.load(os.path.join(folder, "full.pt"))
    finals = {}
    for how in ("dcp", "consolidated", "control"):
        model = _model(mode)
        opt = CompiledSOAP(model.parameters(), **HYPER)
        opt.register_state_dict_post_hook(factors_as_dicts)
        if how == "dcp":
            state = _dcp_state(model, opt)  # the template (DCP first initialises the state with a zero step)
            dcp.load(state, checkpoint_id=os.path.join(folder, "dcp"))
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, opt, state["optim"],
                                     options=StateDictOptions(flatten_optimizer_state_dict=True))
        else:
            with torch.no_grad():
                for p, v in zip(model.parameters(), saved["params"]):
                    if hasattr(p, "device_mesh"):
                        from torch.distributed.tensor import distribute_tensor

                        p.to_local().copy_(distribute_tensor(v, p.device_mesh, p.placements).to_local())
                    else:
                        p.copy_(v)
            if how == "consolidated":
                opt.load_state_dict(saved["optim"])
        for _ in range(BEFORE, CALLS):
            opt.zero_grad()
            _feed(model)
            opt.step()
        finals[how] = _params(model)
        del model, opt
    if rank == 0:
        torch.save(finals, os.path.join(folder, f"resumed{world}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["replicated", "fsdp"])
def test_checkpoint_at_two_ranks_resumes_at_one_and_four(tmp_path, mode):
    """Saved at world size 2 (DCP, flattened; and consolidated), loaded at 1 and 4: the continuation equals the
    uninterrupted run within the rounding bound (other world sizes stack other buckets), and a control that loads no
    optimizer state is outside it."""
    _spawn(_save_worker, str(tmp_path), 2, mode)
    uninterrupted = torch.load(tmp_path / "uninterrupted.pt")
    for world in (1, 4):
        _spawn(_resume_worker, str(tmp_path), world, mode)
        finals = torch.load(tmp_path / f"resumed{world}.pt")
        start = torch.load(tmp_path / "full.pt")["params"]  # the parameters at the checkpoint
        with pytest.raises(AssertionError):
            agree(finals["control"], uninterrupted, start)
        for how in ("dcp", "consolidated"):
            print(world, how, agree(finals[how], uninterrupted, start))
    # ... and the sharded uninterrupted run is the single-process one (full-batch gradients at every call)
    model = _model()
    opt = CompiledSOAP(model.parameters(), **HYPER)
    for call in range(CALLS):
        opt.zero_grad()
        _feed(model, first=call == 0)
        opt.step()
    print(mode, agree(uninterrupted, _params(model), _params(_model())))


# ------------------------------------------------------------------------------------------------------ host logic


def _late_group_worker(rank, world, folder, mode):
    """The last layer joins as a second param group (own lr) after two calls; at call 3 the first bias has no
    gradient on any rank (an unused parameter, as FSDP2 leaves it)."""
    _init(rank, world, folder)
    model = _model(mode)
    report = _late_group_run(model, _feed)
    if rank == 0:
        torch.save(report, os.path.join(folder, f"late-{mode}.pt"))
    del model
    dist.destroy_process_group()


def _late_group_run(model, feed):
    """Returns the parameters after CALLS calls, and whether a deep copy of the optimizer then steps its copies of
    the parameters exactly like the original steps the model's (sharded: the copy sets up its own sharding)."""
    params = list(model.parameters())
    opt = CompiledSOAP(params[:4], **HYPER)
    for call in range(CALLS):
        if call == 2:
            opt.add_param_group({"params": params[4:], "lr": 1e-3})
        opt.zero_grad()
        feed(model, first=call in (0, 2))  # the first group initialises at call 0, the late one at call 2
        if call == 3:
            params[1].grad = None
        opt.step()
    twin = copy.deepcopy(opt)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    opt.zero_grad()
    feed(model)
    for p, q in zip(params, twin_params):
        q.grad = p.grad.clone()
    opt.step()
    twin.step()
    return _params(model), all(torch.equal(_full(p), _full(q)) for p, q in zip(params, twin_params))


@pytest.mark.parametrize("mode", ["replicated", "fsdp"])
def test_late_param_group_and_missing_gradient(tmp_path, mode):
    _spawn(_late_group_worker, str(tmp_path), 2, mode)
    got = torch.load(tmp_path / f"late-{mode}.pt")

    want, _ = _late_group_run(_model(), _feed)
    (got, twin_equal) = got
    print(mode, agree(got, want, _params(_model())))
    assert not torch.equal(got[1], _params(_model())[1])
    assert twin_equal


def _idle_rank_worker(rank, world, folder):
    """Three parameters over four ranks: one rank owns nothing. DCP's get_optimizer_state_dict steps an optimizer
    whose `state` is falsy; that rank must not (the others would not join its collectives)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    _init(rank, world, folder)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2, bias=False)).double()
    opt = CompiledSOAP(model.parameters(), **HYPER)
    for _ in range(2):
        opt.zero_grad()
        model(torch.ones(2, 4, dtype=torch.float64)).sum().backward()
        opt.step()
    opt.zero_grad()
    owned = opt.owned_parameters()
    state = get_optimizer_state_dict(model, opt)
    torch.save({"owned": owned, "keys": sorted(state["state"]), "truthy": bool(opt.state)},
               os.path.join(folder, f"idle{rank}.pt"))
    del model, opt
    dist.destroy_process_group()


def test_a_rank_owning_nothing_does_not_hang_checkpointing(tmp_path):
    _spawn(_idle_rank_worker, str(tmp_path), 4)
    reports = [torch.load(tmp_path / f"idle{r}.pt") for r in range(4)]
    assert sorted(len(r["owned"]) for r in reports) == [0, 1, 1, 1]
    assert all(r["truthy"] for r in reports)
    assert sum(len(r["keys"]) for r in reports) == 3
