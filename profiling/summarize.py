"""Table per annotated range: count, CPU time, and the GPU work each occurrence launched.

Two inputs, one model:
  * an Nsight Systems SQLite export (`nsys export --type sqlite`): ranges from NVTX_EVENTS, API calls from
    CUPTI_ACTIVITY_KIND_RUNTIME (runtime and driver API), kernels from CUPTI_ACTIVITY_KIND_KERNEL;
  * a torch.profiler Chrome trace (`prof.export_chrome_trace`): ranges are record_function "user_annotation" events,
    API calls are "cuda_runtime"/"cuda_driver" events, kernels are "kernel" events.
An API call belongs to a range when it was made on the range's thread between its start and end; a kernel belongs to
the range of the call that launched it (correlation id), so work that runs on the GPU after the range closed (the
host ran ahead) still counts. Nested ranges each count everything inside them.
A table that is missing (e.g. no NVTX, or a CPU-only trace) gives empty/None columns instead of an error.

Usage: python -m profiling.summarize FILE.sqlite|FILE.json [--json OUT] [--match SUBSTRING]
"""

from __future__ import annotations

import argparse
import bisect
import json
import re
import sqlite3
import sys
from collections import defaultdict
from dataclasses import dataclass, field

# API names, without nsys's version suffix ("cudaLaunchKernel_v7000"). Prefix match: cuLaunchKernelEx,
# cudaLaunchKernelExC, ... are launches too.
_KINDS = [
    ("graph", ("cudaGraphLaunch", "cuGraphLaunch")),
    ("launch", ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchCooperativeKernel", "cuLaunchCooperativeKernel")),
    ("memcpy", ("cudaMemcpy", "cuMemcpy")),
    ("sync", ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cuStreamSynchronize",
              "cuCtxSynchronize", "cuEventSynchronize")),
]
_SUFFIX = re.compile(r"_v\d+$")


def classify(api_name: str) -> str | None:
    name = _SUFFIX.sub("", api_name)
    for kind, prefixes in _KINDS:
        if name.startswith(prefixes):
            return kind
    return None


@dataclass
class Trace:
    """Times in ns. `calls[thread]` is sorted by start: (start, correlation key, kind)."""
    ranges: list = field(default_factory=list)  # (name, start, end, thread)
    calls: dict = field(default_factory=lambda: defaultdict(list))
    kernels: dict = field(default_factory=dict)  # correlation key -> [count, total ns]
    has_calls: bool = False
    has_kernels: bool = False
    notes: list = field(default_factory=list)


# ------------------------------------------------------------------ readers


def _tables(con) -> set:
    return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}


def _columns(con, table) -> set:
    return {r[1] for r in con.execute(f"PRAGMA table_info({table})")}


def read_nsys_sqlite(path: str) -> Trace:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    tables = _tables(con)
    tr = Trace()
    strings = dict(con.execute("SELECT id, value FROM StringIds")) if "StringIds" in tables else {}

    if "NVTX_EVENTS" in tables:
        cols = _columns(con, "NVTX_EVENTS")
        text_id = "textId" if "textId" in cols else "NULL"
        domain_col = "domainId" if "domainId" in cols else "0"
        # eventType 75 = domain creation: its text is the domain's name.
        domains = dict(con.execute(f"SELECT {domain_col}, text FROM NVTX_EVENTS WHERE eventType = 75"))
        # 59 = push/pop range, 60 = start/end range. Unclosed ranges (end NULL) are dropped.
        for start, end, text, tid_, gtid, dom in con.execute(
            f"SELECT start, end, text, {text_id}, globalTid, {domain_col} FROM NVTX_EVENTS "
            "WHERE eventType IN (59, 60) AND end IS NOT NULL"
        ):
            name = text if text is not None else strings.get(tid_, "?")
            dname = domains.get(dom)
            tr.ranges.append((f"{dname}:{name}" if dname else name, start, end, gtid))
    else:
        tr.notes.append("no NVTX_EVENTS table (was the capture range empty, or -t nvtx missing?)")

    if "CUPTI_ACTIVITY_KIND_RUNTIME" in tables:
        tr.has_calls = True
        for start, gtid, corr, name_id in con.execute(
            "SELECT start, globalTid, correlationId, nameId FROM CUPTI_ACTIVITY_KIND_RUNTIME"
        ):
            # globalTid carries the pid in bits 24+; correlation ids are unique per process.
            tr.calls[gtid].append((start, (gtid >> 24, corr), classify(strings.get(name_id, ""))))
    else:
        tr.notes.append("no CUPTI_ACTIVITY_KIND_RUNTIME table: launch counts unavailable")

    if "CUPTI_ACTIVITY_KIND_KERNEL" in tables:
        tr.has_kernels = True
        for gpid, corr, n, dur in con.execute(
            "SELECT globalPid, correlationId, COUNT(*), SUM(end - start) FROM CUPTI_ACTIVITY_KIND_KERNEL "
            "GROUP BY globalPid, correlationId"
        ):
            tr.kernels[(gpid >> 24, corr)] = [n, dur]
    else:
        tr.notes.append("no CUPTI_ACTIVITY_KIND_KERNEL table: no kernel ran in the capture")
    con.close()
    for lst in tr.calls.values():
        lst.sort()
    return tr


def read_torch_trace(path_or_dict) -> Trace:
    """torch.profiler Chrome trace (timestamps in µs, converted to ns)."""
    if isinstance(path_or_dict, dict):
        data = path_or_dict
    else:
        with open(path_or_dict) as f:
            data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    tr = Trace()
    for e in events:
        if e.get("ph") != "X":
            continue
        cat = e.get("cat", "")
        start = int(float(e["ts"]) * 1000)
        thread = (e.get("pid"), e.get("tid"))
        if cat == "user_annotation":
            tr.ranges.append((e["name"], start, start + int(float(e.get("dur", 0)) * 1000), thread))
        elif cat in ("cuda_runtime", "cuda_driver"):
            tr.has_calls = True
            tr.calls[thread].append((start, e.get("args", {}).get("correlation"), classify(e["name"])))
        elif cat == "kernel":
            tr.has_kernels = True
            k = tr.kernels.setdefault(e.get("args", {}).get("correlation"), [0, 0])
            k[0] += 1
            k[1] += int(float(e.get("dur", 0)) * 1000)
    for lst in tr.calls.values():
        lst.sort(key=lambda c: c[0])
    if not tr.has_calls:
        tr.notes.append("no CUDA API events in the trace (CPU-only run?): launch and kernel columns are empty")
    return tr


def read(path: str) -> Trace:
    if path.endswith((".sqlite", ".db")):
        return read_nsys_sqlite(path)
    return read_torch_trace(path)


# ------------------------------------------------------------------ summary


def summarize(tr: Trace, match: str | None = None) -> list[dict]:
    """One dict per range name, in order of first appearance; per-occurrence means of the GPU-side columns."""
    acc: dict[str, dict] = {}
    for name, start, end, thread in sorted(tr.ranges, key=lambda r: r[1]):
        if match and match not in name:
            continue
        a = acc.setdefault(name, defaultdict(float))
        a["count"] += 1
        a["cpu_ns"] += end - start
        calls = tr.calls.get(thread, [])
        lo = bisect.bisect_left(calls, start, key=lambda c: c[0])
        hi = bisect.bisect_right(calls, end, key=lambda c: c[0])
        for _, corr, kind in calls[lo:hi]:
            if kind:
                a[kind] += 1
            k = tr.kernels.get(corr) if corr is not None else None
            if k:
                a["kernels"] += k[0]
                a["kernel_ns"] += k[1]
    rows = []
    for name, a in acc.items():
        n = a["count"]
        per = (lambda key: a[key] / n) if tr.has_calls else (lambda key: None)
        kper = (lambda key: a[key] / n) if tr.has_kernels else (lambda key: None)
        rows.append({
            "range": name,
            "count": int(n),
            "total_ms": a["cpu_ns"] / 1e6,
            "mean_ms": a["cpu_ns"] / n / 1e6,
            "kernels_per": kper("kernels"),
            "kernel_ms_per": None if kper("kernel_ns") is None else kper("kernel_ns") / 1e6,
            "launches_per": per("launch"),
            "graph_launches_per": per("graph"),
            "memcpy_per": per("memcpy"),
            "syncs_per": per("sync"),
            # Kernel time over the range's CPU wall time; > 1 when the GPU ran the range's work later.
            "gpu_busy": (a["kernel_ns"] / a["cpu_ns"]) if tr.has_kernels and a["cpu_ns"] else None,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    cols = [("range", "range", "{}"), ("count", "count", "{}"), ("total_ms", "total ms", "{:.2f}"),
            ("mean_ms", "mean ms", "{:.3f}"), ("kernels_per", "kernels/occ", "{:.1f}"),
            ("kernel_ms_per", "kernel ms/occ", "{:.3f}"), ("launches_per", "launches/occ", "{:.1f}"),
            ("graph_launches_per", "graphs/occ", "{:.1f}"), ("memcpy_per", "memcpy/occ", "{:.1f}"),
            ("syncs_per", "syncs/occ", "{:.1f}"), ("gpu_busy", "gpu busy", "{:.2f}")]
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        cells.append(["-" if r[k] is None else fmt.format(r[k]) for k, _, fmt in cols])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c[i].ljust(widths[i]) if i == 0 else c[i].rjust(widths[i]) for i in range(len(cols)))
             for c in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m profiling.summarize", description=__doc__.split("\n")[0])
    ap.add_argument("path", help="nsys SQLite export (.sqlite) or torch.profiler Chrome trace (.json)")
    ap.add_argument("--match", help="only ranges whose name contains this")
    ap.add_argument("--json", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    tr = read(args.path)
    rows = summarize(tr, args.match)
    for note in tr.notes:
        print(f"note: {note}", file=sys.stderr)
    print(format_table(rows) if rows else "no annotated ranges found")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"source": args.path, "notes": tr.notes, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
