#!/usr/bin/env bash
# Profile the steady-state optimizer steps under Nsight Systems, export SQLite, print the per-NVTX-range summary.
#
#   profiling/nsys_profile.sh [-o OUT_PREFIX] [-- COMMAND ...]
#
# Without a command it runs `python -m profiling.bench` on gpt2-small with --nsys, which warms every optimizer up
# first and only then opens the capture range (cudaProfilerStart/Stop), so compilation and graph recording stay out
# of the report. The repository root is put on PYTHONPATH, so `-m profiling.<module>` works from any directory.
# A command of your own must open and close the range itself (torch.cuda.cudart().cudaProfilerStart() / Stop()),
# or pass NSYS_WHOLE=1 to capture the whole run.
# --cuda-graph-trace=node: show the kernels inside replayed CUDA graphs (the default shows one opaque graph).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
export PYTHONPATH="$(dirname "$here")${PYTHONPATH:+:$PYTHONPATH}"
out="runs/nsys-$(date +%Y%m%d-%H%M%S)"
if [[ "${1:-}" == "-o" ]]; then out="$2"; shift 2; fi
if [[ "${1:-}" == "--" ]]; then shift; fi
if [[ $# -eq 0 ]]; then
  set -- "${PYTHON:-python}" -m profiling.bench --preset gpt2-small --device cuda --nsys --json "$out.json"
fi

if ! command -v nsys >/dev/null 2>&1; then
  echo "nsys not found. Same summary without it: python -m profiling.bench ... --torch-profile TRACE.json" >&2
  echo "then python -m profiling.summarize TRACE.json" >&2
  exit 2
fi

capture=(--capture-range=cudaProfilerApi --capture-range-end=stop)
if [[ "${NSYS_WHOLE:-0}" == "1" ]]; then capture=(); fi

mkdir -p "$(dirname "$out")"
nsys profile -t cuda,nvtx --cuda-graph-trace=node ${capture[@]+"${capture[@]}"} \
  --sample=none --cpuctxsw=none --force-overwrite=true -o "$out" "$@"
nsys export --type=sqlite --force-overwrite=true --output="$out.sqlite" "$out.nsys-rep"
"${PYTHON:-python}" -m profiling.summarize "$out.sqlite" --json "$out.summary.json"
echo "report: $out.nsys-rep  sqlite: $out.sqlite  summary: $out.summary.json"
