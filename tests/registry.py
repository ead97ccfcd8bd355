"""The one registry of optimizer variants the tests run, modelled on torch's `OptimizerInfo`.

Each `Variant` says, as data: which class and constructor options it is, which configurations apply to it (`Config`:
torch's `OptimizerInput` without params, the `optim_inputs_func` style), and which checks are known not to apply,
with the reason. tests/conftest.py builds its fixtures from it, and tests/run_torch_suite.py turns it into
`OptimizerInfo` entries (configurations as `OptimizerInput`) for torch's own generic optimizer suite.

torch's helpers themselves (torch.testing._internal.common_optimizers) are not imported here: importing them imports
common_utils, which calls torch.backends.disable_global_flags() for the whole process (and needs expecttest), so
they are used only in the separate process of tests/run_torch_suite.py.

Known differences from torch.optim that every variant shares are in `KNOWN_DIFFERENCES`; the tests that pin them
(tests/test_torch_contract.py) compare against what torch.optim does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch

from compiled_soap import SOAP, CompiledSOAP

# torch.optim behaviour SOAP and CompiledSOAP deliberately do not follow: {check: reason}.
KNOWN_DIFFERENCES = {
    "duplicate parameter in a param group": "raises ValueError where torch.optim warns: SOAP would step the tensor "
                                            "twice with one state (README, 'The same tensor listed twice')",
    "eps=0": "refused (torch.optim allows it): an exactly-zero projected gradient component would be 0/0 = NaN",
    "foreach / fused / differentiable / capturable": "not constructor options: the stacked step is one batched "
                                                     "(compiled) function already; supported_impls=()",
    "maximize": "not an option of the paper's SOAP",
    "sparse gradients": "refused with a RuntimeError (SOAP's factors are dense Gram matrices)",
    "complex parameters": "refused with a ValueError (the paper's SOAP is real-valued)",
}


class Config(NamedTuple):
    """Constructor keyword arguments and a description: torch's OptimizerInput with params=None."""

    kwargs: dict
    desc: str


def OptimizerInput(params, kwargs, desc):  # noqa: N802 (the shape of torch's class; params is always None here)
    return Config(kwargs, desc)


def _configs() -> list[Config]:
    """The hyperparameter configurations every variant is run with (torch's `optim_inputs_func` style: params=None,
    kwargs, desc). Small f so that 20-step tests cross several eigenbasis refreshes."""
    return [
        OptimizerInput(params=None, kwargs={}, desc="default"),
        OptimizerInput(params=None, kwargs={"lr": torch.tensor(0.01)}, desc="tensor lr"),
        OptimizerInput(params=None, kwargs={"weight_decay": 0.1}, desc="weight decay"),
        OptimizerInput(params=None, kwargs={"precondition_frequency": 1}, desc="refresh every step"),
        OptimizerInput(params=None, kwargs={"precondition_frequency": 2, "merge_dims": True}, desc="f=2, merge_dims"),
        OptimizerInput(params=None, kwargs={"precondition_1d": True}, desc="precondition_1d"),
        OptimizerInput(params=None, kwargs={"normalize_grads": True}, desc="normalize_grads"),
        OptimizerInput(params=None, kwargs={"correct_bias": False}, desc="no bias correction"),
        OptimizerInput(params=None, kwargs={"max_precond_dim": 4}, desc="small max_precond_dim"),
        OptimizerInput(params=None, kwargs={"betas": (0.9, 0.99), "eps": 1e-6}, desc="betas and eps"),
    ]


# Configurations only some variants take (constructor options outside the hyperparameters).
CHOLESKY = OptimizerInput(params=None, kwargs={"orthogonalization": "cholesky", "precondition_frequency": 2},
                          desc="CholeskyQR refresh")
UNSHARDED = OptimizerInput(params=None, kwargs={"shard": False}, desc="shard=False")


@dataclass(frozen=True)
class Variant:
    """One optimizer under test: `cls(params, **options, **hyperparameters)`."""

    name: str
    cls: type
    options: dict = field(default_factory=dict)
    extra_configs: tuple = ()  # configurations beyond the shared ones that apply (Config)
    slow: bool = False  # compiles with Inductor: opt-in (pytest -m compile), and few configurations
    not_applicable: dict = field(default_factory=dict)  # check -> why it does not apply to this variant

    def __call__(self, params, **hyperparameters):
        return self.cls(params, **{**self.options, **hyperparameters})

    def configs(self) -> list[Config]:
        out = _configs() + list(self.extra_configs)
        return out[:2] if self.slow else out

    @property
    def factory(self) -> Callable[..., Any]:
        return functools.partial(self.cls, **self.options)


_COMPILED_EXTRAS = (CHOLESKY, UNSHARDED)
REGISTRY: tuple[Variant, ...] = (
    Variant("soap", SOAP, extra_configs=(CHOLESKY,),
            not_applicable={"shard=False": "SOAP (the reference) never shards"}),
    Variant("stacked-eager", CompiledSOAP, {"compile": False}, _COMPILED_EXTRAS),
    Variant("aot-eager", CompiledSOAP, {"backend": "aot_eager"}, _COMPILED_EXTRAS),
    Variant("inductor", CompiledSOAP, {"mode": None}, _COMPILED_EXTRAS, slow=True,  # mode=None: no CUDA graphs
            not_applicable={"most configurations": "Inductor's CPU compile takes minutes per graph: the default and "
                                                   "tensor-lr configurations only"}),
)
BY_NAME = {v.name: v for v in REGISTRY}
