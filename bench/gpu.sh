#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one go: the GPU-only tests and the benchmarks whose GPU numbers
# docs/training.md quotes, and the README's one-GPU job with its evaluation. About 8 minutes on one H100
# once the demo world and tiny base are cached (building them first, as `python train.py` does, adds a
# few minutes).
#
#   pip install -e '.[gpu]'          # flash-attn, for the packed flash-attention test
#   bash bench/gpu.sh                # logs in outputs/gpu-checks/
#   bash bench/gpu.sh /tmp/checks    # elsewhere
#
# Each step's output goes to <name>.log; its last lines are printed. A failing step does not stop the
# others; the exit status is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/gpu-checks}
mkdir -p "$out"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: no CUDA GPU is visible')" || exit 1

failed=()
step() {
    local name=$1
    shift
    echo "== $name: $*"
    if ! "$@" >"$out/$name.log" 2>&1; then
        failed+=("$name")
    fi
    tail -n 14 "$out/$name.log"
    echo
}

step tests python -m pytest -q -p no:cacheprovider -rs tests/test_parallel_gpu.py tests/test_packing.py \
    tests/test_bench_throughput.py -k "gpu or flash"
# The README's one-GPU job and its evaluation (bf16-mixed, generation on the GPU).
step train-gpu python train.py trainer=gpu hydra.run.dir="$out/train-gpu"
step eval-gpu python eval.py ckpt="$out/train-gpu/checkpoints/last.ckpt" hydra.run.dir="$out/eval-gpu"
step throughput-bf16 python -m bench.throughput --device cuda --dtype bfloat16
step throughput-fp32 python -m bench.throughput --device cuda --dtype float32
step packing python -m bench.packing --device cuda

if ((${#failed[@]})); then
    echo "failed: ${failed[*]} (logs in $out)"
    exit 1
fi
echo "all passed (logs in $out)"
