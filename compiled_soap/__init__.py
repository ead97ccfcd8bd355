"""compiled_soap: SOAP (Vyas et al. 2024) with the whole optimizer step as one CUDA graph.

`SOAP` is the eager per-parameter reference; `CompiledSOAP` is the fast path that computes the same thing.
"""

from .checkpoint import factors_as_dicts, merge_state_dicts
from .compiled import CompiledSOAP
from .reference import SOAP

__all__ = ["SOAP", "CompiledSOAP", "merge_state_dicts", "factors_as_dicts"]
__version__ = "0.1.0"
