"""Run torch's generic optimizer suite, `TestOptimRenewed`, over this project's variants (tests/registry.py).

torch tests every optimizer it ships with one suite driven by `OptimizerInfo` entries; the suite itself
(pytorch/pytorch, test/test_optim.py) is not in the torch wheel and is not part of this project. Take a copy whose
imports match the installed torch and pass its path:

    python tests/run_torch_suite.py PATH/TO/test_optim.py [--variants soap,stacked-eager] [--dtype float64] [-k NAME]

What it does: replaces `optim_db` with one `OptimizerInfo` per variant (supported_impls=(), no sparse, no complex,
the registry's configurations as `optim_inputs_func`, our error inputs), stubs the three sibling modules the file
imports for other test classes (optim.test_lrscheduler, optim.test_optim, optim.test_swa_utils: not run here),
imports the file, and runs its CPU test class with unittest. `--dtype float64` runs every test in float64 instead of
the dtype its decorator names (the suite's tests are written for float32). It prints pass/fail/error/skip counts per
variant and exits non-zero on any failure. Not collected by pytest (its name does not start with test_). torch's
testing helpers import `expecttest` (pip install expecttest), which the project's tests do not need.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import re
import sys
import types
import unittest
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.testing._internal.common_optimizers as common_optimizers  # noqa: E402
from torch.testing._internal.common_methods_invocations import DecorateInfo  # noqa: E402
from torch.testing._internal.common_optimizers import (ErrorOptimizerInput, OptimizerInfo,  # noqa: E402
                                                       OptimizerInput, get_error_inputs_for_all_optims)

from registry import BY_NAME, REGISTRY  # noqa: E402

# Test names of the suite that cannot apply to an optimizer without foreach/fused, sparse or complex support; they
# instantiate nothing for our entries (their @optims filter leaves none) or skip on CPU. Listed for the report.
NOT_APPLICABLE = {
    "test_rosenbrock_sparse": "sparse gradients (supports_sparse=False)",
    "test_complex, test_complex_2d": "complex parameters (supports_complex=False)",
    "test_foreach_*, test_fused_*, test_mixed_device_dtype, test_set_default_dtype_works_with_foreach, "
    "test_peak_memory_foreach, test_cpu_load_state_dict, test_defaults_changed_to_foreach":
        "foreach/fused implementations (supported_impls=())",
    "test_second_order_optims_return_consistent_types": "closure-requiring optimizers only (LBFGS)",
    "test_forloop_goes_right_direction_multigpu, test_state_dict_with_cuda_params": "CUDA only",
}


# Tests of the suite that apply but cannot pass for a reason outside the optimizer: {test: why}. Each is covered by a
# test of our own (named in the reason).
SKIPPED = {
    "test_load_state_dict_post_hook": "its post hook marks 'the pre hook ran' by lr == 0.003, and 0.003 is SOAP's "
                                      "default lr, so the mark is set without the pre hook; covered by "
                                      "tests/test_torch_contract.py::test_load_state_dict_hooks_as_torch_optim",
}


def error_inputs(device, dtype):
    """torch's error inputs for every optimizer, with our one known difference (registry.KNOWN_DIFFERENCES): the
    same tensor twice in a group raises ValueError instead of warning."""
    out = []
    for e in get_error_inputs_for_all_optims(device, dtype):
        if e.error_type is UserWarning and "duplicate" in e.error_regex:
            e = ErrorOptimizerInput(e.optimizer_error_input, error_on=e.error_on, error_type=ValueError,
                                    error_regex="is the same tensor")
        out.append(e)
    return out


def subclass(variant):
    """A class named after the variant (the suite names its tests by optim_cls.__name__) that constructs it."""
    def __init__(self, params, *args, **kwargs):
        variant.cls.__init__(self, params, *args, **{**variant.options, **kwargs})

    name = variant.cls.__name__ + ("" if variant.name == "soap" else "_" + re.sub(r"\W", "_", variant.name))
    return type(name, (variant.cls,), {"__init__": __init__, "__module__": __name__})


def optim_info(variant):
    def inputs(device=None, dtype=None):  # fresh objects at every call: tests edit their kwargs
        return [OptimizerInput(params=None, kwargs=copy.deepcopy(c.kwargs), desc=c.desc) for c in variant.configs()]

    skips = [DecorateInfo(unittest.skip(why), "TestOptimRenewed", test) for test, why in SKIPPED.items()]
    return OptimizerInfo(subclass(variant), optim_inputs_func=inputs, supported_impls=(), not_og_supported_flags=(),
                         supports_complex=False, supports_sparse=False, optim_error_inputs_func=error_inputs,
                         skips=skips)


def load_suite(path, variants, dtype):
    common_optimizers.optim_db[:] = [optim_info(v) for v in variants]
    if dtype is not None:
        original = common_optimizers.optims.__init__

        def forced(self, optim_info_iterable, dtypes=None):
            original(self, optim_info_iterable, dtypes=None if dtypes is None else
                     [dtype if d in (torch.float32, torch.float64) else d for d in dtypes])

        common_optimizers.optims.__init__ = forced
    for name, cls in (("optim.test_lrscheduler", "TestLRScheduler"), ("optim.test_optim", "TestDifferentiableOptimizer"),
                      ("optim.test_swa_utils", "TestSWAUtils")):
        module = types.ModuleType(name)
        setattr(module, cls, None)
        sys.modules[name] = module
    sys.modules.setdefault("optim", types.ModuleType("optim"))
    spec = importlib.util.spec_from_file_location("torch_test_optim", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TestOptimRenewedCPU


class _Result(unittest.TextTestResult):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.outcomes = []

    def _record(self, test, outcome):
        self.outcomes.append((test.id().rsplit(".", 1)[-1], outcome))

    def addSuccess(self, test):
        super().addSuccess(test)
        self._record(test, "pass")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._record(test, "fail")

    def addError(self, test, err):
        super().addError(test, err)
        self._record(test, "error")

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._record(test, "skip")

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._record(test, "xfail")

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._record(test, "fail")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("test_optim", help="path to pytorch's test/test_optim.py")
    parser.add_argument("--variants", default="soap,stacked-eager,aot-eager",
                        help=f"comma-separated, of {[v.name for v in REGISTRY]}")
    parser.add_argument("--dtype", choices=("float32", "float64"), default=None)
    parser.add_argument("-k", default=None, help="run only tests whose name contains this")
    args = parser.parse_args(argv)
    variants = [BY_NAME[n] for n in args.variants.split(",")]
    dtype = getattr(torch, args.dtype) if args.dtype else None
    case = load_suite(args.test_optim, variants, dtype)
    names = [n for n in unittest.TestLoader().getTestCaseNames(case) if args.k is None or args.k in n]
    suite = unittest.TestSuite(case(n) for n in names)
    result = unittest.TextTestRunner(resultclass=_Result, verbosity=1).run(suite)
    per_class = {}
    for name, outcome in result.outcomes:
        cls = next((c for c in sorted((subclass(v).__name__ for v in variants), key=len, reverse=True)
                    if f"_{c}_" in name), "other")
        per_class.setdefault(cls, Counter())[outcome] += 1
    for cls, counts in sorted(per_class.items()):
        print(f"{cls}: " + ", ".join(f"{k} {counts[k]}" for k in ("pass", "fail", "error", "skip", "xfail")))
    print("not applicable (nothing instantiated or skipped on CPU):")
    for tests, why in NOT_APPLICABLE.items():
        print(f"  {tests}: {why}")
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
