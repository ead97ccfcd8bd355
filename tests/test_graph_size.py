"""The compiled step grows with the number of buckets (distinct shapes), not with the number of parameters: its
inputs are the stacked bucket tensors, and parameters are copied in and out around it."""

from __future__ import annotations

import torch

from graph_checks import CaptureBackend, graph_node_count
from compiled_soap import CompiledSOAP


def _block_params(layers, d=8):
    """A transformer-like stack: per layer attention (d, 3d), (d, d), MLP (4d, d), (d, 4d), two norms (d,)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [s for _ in range(layers) for s in [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d), (d,), (d,)]]
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _node_counts(layers):
    params = _block_params(layers)
    backend = CaptureBackend()
    opt = CompiledSOAP(params, precondition_frequency=2, backend=backend)
    for _ in range(3):  # init, plain, refresh
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert len(backend.records) == 2
    return [graph_node_count(r) for r in backend.records]


def test_graph_size_independent_of_depth():
    one, sixteen = _node_counts(1), _node_counts(16)
    for a, b in zip(one, sixteen):
        assert b.dynamo <= 1.25 * a.dynamo and b.aten <= 1.25 * a.aten, (one, sixteen)
