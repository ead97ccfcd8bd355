"""GPT-style parameter lists for the benchmark, and the fixed synthetic gradients fed to every optimizer.

Only the optimizer is timed, so a model is nothing but its parameter shapes: no nn.Module, no forward pass.
Layout follows GPT-2 (Radford et al. 2019): token and position embeddings, per block LN/attention/LN/MLP, final LN,
LM head tied to the token embedding (so it adds no parameter). Weights use the nn.Linear (out, in) convention; SOAP's
factor sizes are the same either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Preset:
    name: str
    layers: int
    d_model: int
    d_mlp: int
    vocab: int
    ctx: int
    note: str = ""

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        d, h = self.d_model, self.d_mlp
        out: list[tuple[str, tuple[int, ...]]] = [("wte", (self.vocab, d)), ("wpe", (self.ctx, d))]
        for i in range(self.layers):
            b = f"h{i}."
            out += [
                (b + "ln_1.weight", (d,)), (b + "ln_1.bias", (d,)),
                (b + "attn.qkv.weight", (3 * d, d)), (b + "attn.qkv.bias", (3 * d,)),
                (b + "attn.proj.weight", (d, d)), (b + "attn.proj.bias", (d,)),
                (b + "ln_2.weight", (d,)), (b + "ln_2.bias", (d,)),
                (b + "mlp.fc.weight", (h, d)), (b + "mlp.fc.bias", (h,)),
                (b + "mlp.proj.weight", (d, h)), (b + "mlp.proj.bias", (d,)),
            ]
        out += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
        return out

    def numel(self) -> int:
        return sum(_prod(s) for _, s in self.shapes())

    def describe(self) -> str:
        return (f"GPT-2-style, {self.layers} layers, d_model {self.d_model}, MLP {self.d_mlp}, vocab {self.vocab}, "
                f"context {self.ctx}, LM head tied to the token embedding")


PRESETS = {
    p.name: p
    for p in [
        # Small enough that all four optimizers (CompiledSOAP's compile included) run in seconds on 2 CPU cores.
        Preset("tiny", layers=2, d_model=64, d_mlp=256, vocab=512, ctx=128, note="CPU smoke size"),
        # The GPT-2 layout of the memory comparison (3.36M parameters): big enough that state dominates.
        Preset("gpt2-l4-d256", layers=4, d_model=256, d_mlp=1024, vocab=512, ctx=256, note="GPT-2 layout, 3.4M"),
        # 124,439,808 parameters. With max_precond_dim=10000 the 50257-long vocab axis of wte gets no factor.
        Preset("gpt2-small", layers=12, d_model=768, d_mlp=3072, vocab=50257, ctx=1024, note="GPT-2 small, 124M"),
        # The two models of NVIDIA Emerging-Optimizers PR #118 (12 layers, 4 matrices per block = 96 QR calls per
        # refresh there; ours has 3 more: the embeddings, which that count left out).
        Preset("pr118-h1024", layers=12, d_model=1024, d_mlp=4096, vocab=50257, ctx=1024, note="PR #118, hidden 1024"),
        Preset("pr118-h2048", layers=12, d_model=2048, d_mlp=4096, vocab=50257, ctx=1024, note="PR #118, hidden 2048"),
        # 1,114,290,176 parameters: the model of profiling/scale_estimate.py's 8-GPU estimate (docs/distributed.md).
        Preset("gpt-1b", layers=20, d_model=2048, d_mlp=8192, vocab=50257, ctx=2048, note="GPT-style, 1.1B"),
    ]
}


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def make_params(preset: Preset, device: torch.device, seed: int = 0) -> list[torch.nn.Parameter]:
    """Fresh fp32 parameters; every optimizer gets its own copy with identical values."""
    g = torch.Generator(device=device).manual_seed(seed)
    params = []
    for name, shape in preset.shapes():
        if len(shape) == 1:
            t = torch.ones(shape, device=device) if name.endswith("weight") else torch.zeros(shape, device=device)
        else:
            t = torch.randn(shape, device=device, generator=g) * 0.02
        params.append(torch.nn.Parameter(t))
    return params


def make_grads(preset: Preset, device: torch.device, seed: int = 1, rank: int = 16, noise: float = 0.1,
               rms: float = 1e-3) -> list[torch.Tensor]:
    """One fixed gradient per parameter, low-rank plus noise.

    Real transformer gradients have a fast-decaying spectrum; pure Gaussian noise would give full-rank, well
    conditioned factors that flatter fast orthogonalisations. So: sum_k s_k a_k b_k^T with s_k = 1/(k+1), plus a
    small full-rank noise floor (noise relative to the low-rank part), scaled to a typical RMS of 1e-3.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    grads = []
    for _, shape in preset.shapes():
        if len(shape) == 1:
            t = torch.randn(shape, device=device, generator=g)
        else:
            m, n = shape
            r = min(rank, m, n)
            a = torch.randn(m, r, device=device, generator=g)
            b = torch.randn(r, n, device=device, generator=g)
            s = 1.0 / torch.arange(1, r + 1, device=device, dtype=torch.float32)
            t = (a * s) @ b
            t = t / t.pow(2).mean().sqrt()
            t.add_(torch.randn(shape, device=device, generator=g), alpha=noise)
        t.mul_(rms / t.pow(2).mean().sqrt())
        grads.append(t)
    return grads
