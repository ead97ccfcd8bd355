"""examples/train_gpt.py at a tiny size on CPU: it trains, writes its outputs, and resumes exactly.

The example runs as a subprocess, the way a user runs it. One training run of every optimizer is shared by the tests
(module fixture); it also writes the mid-run checkpoint the resume test continues from.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import compiled_soap
from tests.spawning import SUBPROCESS_TIMEOUT_S

pytestmark = pytest.mark.xdist_group("example")  # the tests share one run of the example (pyproject.toml)

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_gpt.py"
STEPS = 40
TINY = [
    "--device", "cpu", "--threads", "1", "--steps", str(STEPS), "--batch-size", "8", "--block-size", "32",
    "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--lr", "1e-2", "--data-bytes", "300000",
    "--eval-batches", "4",
]
OPTIMIZERS = ["adamw", "soap"] + (["compiled-soap"] if getattr(compiled_soap, "CompiledSOAP", None) else [])


def run_example(out: Path, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    # One checkpoint, at step 30 (the next would be at 60): the resume test continues from it.
    return out, run_example(out, "--optimizers", ",".join(OPTIMIZERS), "--save-every", "30")


def test_summary_and_plot(full_run):
    out, summary = full_run
    assert list(summary) == ["optimizers"]
    assert list(summary["optimizers"]) == OPTIMIZERS
    for name, r in summary["optimizers"].items():
        for key in ("final_loss", "val_loss", "step_ms", "tokens_per_s", "warmup_s", "first_loss"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (name, key, r[key])
        assert r["steps"] == STEPS and len(r["losses"]) == STEPS
        assert all(math.isfinite(v) for v in r["losses"])
        # A byte-level model starts at ln(256) = 5.5 nats; 40 steps of any of the optimizers get well below.
        assert r["final_loss"] < r["first_loss"] - 0.5, (name, r["first_loss"], r["final_loss"])
        assert r["val_loss"] < r["first_loss"] - 0.5, (name, r["first_loss"], r["val_loss"])
    if "compiled-soap" in summary["optimizers"]:
        # Same update as the reference: the training curves agree to float rounding.
        soap, fast = summary["optimizers"]["soap"], summary["optimizers"]["compiled-soap"]
        assert abs(soap["final_loss"] - fast["final_loss"]) < 1e-3
    png = (out / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_resume_continues_identically(full_run, tmp_path):
    out, summary = full_run
    resumed = run_example(tmp_path, "--optimizers", "soap", "--resume", str(out))["optimizers"]["soap"]
    reference = summary["optimizers"]["soap"]
    # Steps 1-30 come from the checkpoint's history, 31-40 were trained again: all must match bit for bit.
    assert resumed["losses"] == reference["losses"]
    assert resumed["final_loss"] == reference["final_loss"]
    assert resumed["val_loss"] == reference["val_loss"]


def test_missing_compiled_soap_is_skipped_with_a_message(monkeypatch, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_gpt", SCRIPT)
    train_gpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_gpt)
    monkeypatch.setattr(compiled_soap, "CompiledSOAP", None, raising=False)
    with pytest.raises(SystemExit, match="no optimizer left"):
        train_gpt.main([*TINY, "--out", str(tmp_path), "--optimizers", "compiled-soap"])
    assert "compiled-soap skipped" in capsys.readouterr().err


@pytest.mark.skipif("compiled-soap" not in OPTIMIZERS, reason="this build has no CompiledSOAP")
def test_compiled_soap_checkpoint_resumes(full_run, tmp_path):
    out, summary = full_run
    # --no-compile keeps this test fast; the checkpoint written by the compiled run loads into either path.
    resumed = run_example(tmp_path, "--optimizers", "compiled-soap", "--no-compile", "--resume", str(out))
    resumed, reference = resumed["optimizers"]["compiled-soap"], summary["optimizers"]["compiled-soap"]
    assert resumed["losses"][:30] == reference["losses"][:30]
    assert resumed["losses"][30:] == pytest.approx(reference["losses"][30:], rel=1e-4)
    assert resumed["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-4)
