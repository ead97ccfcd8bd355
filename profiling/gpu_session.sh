#!/usr/bin/env bash
# Everything that only a GPU can show, for a machine without network access (no pip downloads), in stages that
# each fit one 10-minute command. Run from anywhere; OUTDIR is taken relative to the current directory:
#
#   profiling/gpu_session.sh OUTDIR tests                # CUDA tests: tests/test_cuda.py, tests/test_graph_checks.py
#   profiling/gpu_session.sh OUTDIR capture [ARGS...]    # tests/test_cuda_capture.py: which linear algebra
#                                                        # captures; CompiledSOAP next to a reduce-overhead model
#                                                        # (ARGS go to pytest, e.g. -k linear_algebra)
#   profiling/gpu_session.sh OUTDIR orthogonalization    # Householder vs CholeskyQR at the presets' factor sizes
#   profiling/gpu_session.sh OUTDIR host [ARGS...]       # bench_host.py tables, parameters on cuda, then on cpu
#   profiling/gpu_session.sh OUTDIR bench PRESET... [--BENCH-OPTION ...]   # bench.py per preset: JSON, PNG, table
#   profiling/gpu_session.sh OUTDIR example              # examples/train_gpt.py, GPU configuration
#   profiling/gpu_session.sh OUTDIR distributed          # the sharded mode on NCCL with the one GPU (FSDP2 example
#                                                        # compiled, world 1; bench at W=1), and the gloo bench at
#                                                        # W=1,2,4 on the machine's 16 cores (timings without the
#                                                        # 2-core contention of our CPU machines)
#
# Every stage first installs the project without dependencies or build isolation (both would need the network),
# records the environment (GPU, driver, torch, CUDA, commit) in OUTDIR/env.txt, and writes one log per command,
# OUTDIR/<stage>*.log, that starts with the same environment and the exact command line. The exit status is the
# first failing command's. The python `nvtx` package may be missing there: CompiledSOAP then runs without NVTX
# ranges; carry its wheel to get them. One bench preset per command keeps each command inside 10 minutes.
set -uo pipefail
usage="usage: gpu_session.sh OUTDIR tests|capture [ARGS...]|orthogonalization|host [ARGS...]|bench PRESET...|example|distributed"
out=${1:?$usage}
stage=${2:?$usage}
shift 2
session="profiling/gpu_session.sh $out $stage${*:+ $*}"  # as typed, before OUTDIR is made absolute
mkdir -p "$out" && out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 \
    || { echo "install failed, see $out/install.log"; exit 1; }
gpus=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | paste -sd ';')
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "session: $session"
    echo "gpu, driver, memory: ${gpus:-unknown (no nvidia-smi output)}"
    python3 -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', \
sys.version.split()[0], 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
    python3 -c "import nvtx" 2>/dev/null && echo "nvtx: yes" || echo "nvtx: missing (no NVTX ranges)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git status --porcelain --untracked-files=no \
        2>/dev/null | grep -q . && echo ' (tracked files modified)')"
} >"$out/env.txt" 2>&1

status=0
# run LOG COMMAND...: the environment and the command at the top of LOG, then the command's output (also shown).
run() {
    local log="$out/$1"
    shift
    { cat "$out/env.txt"; echo "\$ $*"; echo; } >"$log"
    echo "\$ $*"
    "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "exit status: $rc" | tee -a "$log"
    if [[ $rc -ne 0 && $status -eq 0 ]]; then status=$rc; fi
}

case "$stage" in
    tests)
        run cuda_tests.log python3 -m pytest -q -p no:cacheprovider -o addopts= tests/test_cuda.py tests/test_graph_checks.py
        ;;
    capture)
        run capture.log python3 -m pytest -q -p no:cacheprovider -o addopts= tests/test_cuda_capture.py -rxs "$@"
        ;;
    orthogonalization)
        run orthogonalization.log python3 -m profiling.bench_orthogonalization --device cuda \
            --sizes gpt2-small,pr118-h1024 --batch 16
        ;;
    host)
        run host-cuda.log python3 -m profiling.bench_host --device cuda "$@"
        run host-cpu.log python3 -m profiling.bench_host --device cpu "$@"
        ;;
    bench)
        presets=()
        while [[ $# -gt 0 && "$1" != -* ]]; do presets+=("$1"); shift; done
        [[ ${#presets[@]} -eq 0 ]] && presets=(gpt2-small)
        for preset in "${presets[@]}"; do
            run "$preset.log" python3 -m profiling.bench --preset "$preset" --device cuda --json "$out/$preset.json" "$@"
        done
        ;;
    example)
        # The progress bars' carriage returns are turned into lines and the it/s lines dropped, in the log only.
        run example.log bash -c 'python3 examples/train_gpt.py --device cuda --out "$1" --n-layer 12 --n-head 12 \
            --n-embd 768 --block-size 512 --batch-size 32 --steps 2000 --lr 3e-3 --data-bytes 0 --eval-batches 50 \
            2>&1 | tr "\r" "\n" | grep -v "it/s"; exit "${PIPESTATUS[0]}"' example "$out/example"
        ;;
    distributed)
        run fsdp-example-cuda.log python3 -m torch.distributed.run --standalone --nproc_per_node 1 \
            examples/train_fsdp.py --compile --steps 60 --out "$out/fsdp-example"
        run bench-distributed-cuda.log python3 -m profiling.bench_distributed --device cuda --worlds 1 --compile
        run bench-distributed-cpu.log python3 -m profiling.bench_distributed --worlds 1,2,4
        ;;
    *)
        echo "unknown stage: $stage ($usage)" >&2
        exit 2
        ;;
esac
exit $status
