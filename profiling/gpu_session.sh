#!/usr/bin/env bash
# Everything that only a GPU can show, for a machine without network access (no pip downloads), in stages that
# each fit a 10-minute command:
#
#   profiling/gpu_session.sh OUTDIR tests              # CUDA tests (one graph replay per step, launches, sync, ...)
#   profiling/gpu_session.sh OUTDIR bench PRESET...    # bench.py per preset: JSON + PNG + printed table
#   profiling/gpu_session.sh OUTDIR example            # examples/train_gpt.py, GPU configuration
#
# Every stage first installs the project without dependencies or build isolation (both would need the network)
# and records the environment (GPU, driver, torch, CUDA, commit) in OUTDIR/env.txt. The python `nvtx` package may
# be missing there: CompiledSOAP then runs without NVTX ranges; carry its wheel to get them.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_session.sh OUTDIR tests|bench PRESET...|example}
stage=${2:?usage: gpu_session.sh OUTDIR tests|bench PRESET...|example}
shift 2
mkdir -p "$out"
export PYTHONUNBUFFERED=1

python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 \
    || { echo "install failed, see $out/install.log"; exit 1; }
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"
    python3 -c "import nvtx" 2>/dev/null && echo "nvtx: yes" || echo "nvtx: missing (no NVTX ranges)"
    git rev-parse HEAD 2>/dev/null || echo "commit: unknown (no .git)"
} >"$out/env.txt" 2>&1

case "$stage" in
    tests)
        python3 -m pytest tests/test_compiled.py -m cuda -v -p no:cacheprovider 2>&1 | tee "$out/cuda_tests.log"
        ;;
    bench)
        for preset in "${@:-gpt2-small}"; do
            echo "\$ python3 profiling/bench.py --preset $preset --device cuda --json $out/$preset.json" \
                | tee "$out/$preset.log"
            python3 profiling/bench.py --preset "$preset" --device cuda --json "$out/$preset.json" 2>&1 \
                | tee -a "$out/$preset.log"
        done
        ;;
    example)
        python3 examples/train_gpt.py --device cuda --out "$out/example" --n-layer 12 --n-head 12 --n-embd 768 \
            --block-size 512 --batch-size 32 --steps 2000 --lr 3e-3 --data-bytes 0 --eval-batches 50 \
            2>&1 | tr '\r' '\n' | grep -v 'it/s' | tee "$out/example.log"
        ;;
    *)
        echo "unknown stage: $stage" >&2
        exit 2
        ;;
esac
