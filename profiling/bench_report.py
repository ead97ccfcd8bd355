"""Environment record, the printed table, and the PNG chart of a benchmark run."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def command_line() -> str:
    """The command that is running, as a user would type it: `python -m profiling.bench ...` for a module run
    (sys.argv[0] is then the file's absolute path), `python path ...` otherwise."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        name = spec.name[: -len(".__main__")] if spec.name.endswith(".__main__") else spec.name
        return shlex.join(["python", "-m", name, *sys.argv[1:]])
    return shlex.join(["python", *sys.argv])


def environment(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if cuda else None
    try:
        import compiled_soap

        pkg_version = compiled_soap.__version__
    except Exception:  # noqa: BLE001 - the env record must not fail the run
        pkg_version = None
    return {
        "device": device.type,
        "gpu_name": torch.cuda.get_device_name(device) if cuda else None,
        "driver": driver.splitlines()[0] if driver else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": _run(["git", "rev-parse", "HEAD"]),
        # The numbers belong to the commit only if the tree was clean.
        "dirty": bool(_run(["git", "status", "--porcelain", "--untracked-files=no"])),
        "command": command_line(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "compiled_soap_version": pkg_version,
        "host": platform.node(),
    }


def _fmt(x, spec="{:.2f}"):
    return "-" if x is None else spec.format(x)


def table(rows: list[dict]) -> str:
    ref = next((r for r in rows if r["optimizer"] == "soap-reference" and r.get("plain_step_ms")), None)

    def speed(r, key):
        if not ref or not r.get(key) or not ref.get(key):
            return "-"
        return f"{ref[key] / r[key]:.2f}x"

    head = ["optimizer", "plain ms [p10-p90]", "refresh ms [p10-p90]", "amortized ms", "speedup p/r/a",
            "compile s", "warm-up s", "launch/step", "graphs/step", "state MiB", "peak MiB", "TFLOP/s"]
    cells = [head]
    for r in rows:
        if r.get("plain_step_ms") is None:
            cells.append([r["optimizer"], "skipped: " + (r.get("skipped") or r.get("error") or "?")]
                         + [""] * (len(head) - 2))
            continue
        mib = 1 / 2**20
        cells.append([
            r["optimizer"],
            f"{r['plain_step_ms']:.3f} [{r['plain_step_ms_p10']:.3f}-{r['plain_step_ms_p90']:.3f}]",
            "-" if r["refresh_step_ms"] is None else
            f"{r['refresh_step_ms']:.3f} [{r['refresh_step_ms_p10']:.3f}-{r['refresh_step_ms_p90']:.3f}]",
            _fmt(r["amortized_step_ms"], "{:.3f}"),
            "/".join(speed(r, k) for k in ("plain_step_ms", "refresh_step_ms", "amortized_step_ms")),
            _fmt(r["compile_s"]),
            _fmt(r.get("warmup_overhead_s")),
            _fmt(r["launches_per_step"], "{:.0f}"),
            _fmt(r["graph_replays_per_step"], "{:.0f}"),
            _fmt(None if r["state_bytes"] is None else r["state_bytes"] * mib, "{:.1f}"),
            _fmt(None if r["peak_bytes"] is None else r["peak_bytes"] * mib, "{:.1f}"),
            _fmt(r["tflops"], "{:.3f}"),
        ])
    widths = [max(len(c[i]) for c in cells if i < len(c)) for i in range(len(head))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(c))).rstrip() for c in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def chart(rows: list[dict], path: str, title: str) -> str | None:
    """Grouped bars (plain / refresh / amortized ms, log scale). Returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    done = [r for r in rows if r.get("plain_step_ms")]
    keys = [("plain_step_ms", "plain"), ("refresh_step_ms", "refresh"), ("amortized_step_ms", "amortized (f=10)")]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * max(1, len(done)), 4))
    w = 0.8 / len(keys)
    for j, (key, label) in enumerate(keys):
        xs = [i + (j - 1) * w for i, r in enumerate(done) if r.get(key)]
        ys = [r[key] for r in done if r.get(key)]
        bars = ax.bar(xs, ys, width=w, label=label)
        ax.bar_label(bars, labels=[f"{y:.3g}" for y in ys], fontsize=6)
    ax.set_xticks(range(len(done)), [r["optimizer"] for r in done], rotation=15)
    ax.set_yscale("log")
    ax.set_ylabel("ms per step (median)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
