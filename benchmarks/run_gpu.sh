#!/usr/bin/env bash
# Every benchmark with GPU-sized settings, in one go (about 8 minutes on one H200, estimated;
# each script has its own time limit so the whole run stays under 10). Needs torch, torchvision, numpy and
# pydantic only (no Ray, MLflow or Optuna). Outputs: $OUT/<script>.txt and $OUT/results.txt
# (the RESULT lines); without $OUT, benchmarks/out/.
#
#     bash benchmarks/run_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-benchmarks/out}"
mkdir -p "$out_dir"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # a checkout that is not pip-installed
# One inductor cache for all the scripts: the graphs bench_step compiles are reused after it.
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/sdd-search-inductor}"

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$out_dir/environment.txt"

run() {  # run <seconds> <script> [args...]; output to $out_dir/<script>[-<n>].txt
    local limit=$1 name=$2
    shift 2
    local file="$out_dir/$name.txt" n=2
    while [ -e "$file" ]; do file="$out_dir/$name-$n.txt"; n=$((n + 1)); done
    echo "== $name $* (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" python "benchmarks/$name.py" --device cuda "$@" 2>&1 | tee "$file"
    local status=${PIPESTATUS[0]}
    echo "== $name: exit $status after $((SECONDS - start))s" | tee -a "$file"
}

run 170 bench_step --batch-sizes 64,512            # compiles the fast-path graphs (cold cache)
run 50 bench_loss --batch-sizes 64,512             # same graphs: cache hits
run 90 bench_data --batch-size 512                 # 50,000 synthetic CIFAR-sized images
run 120 bench_imagefolder --batch-size 256         # 2,048 JPEGs, resnet34 -> resnet18 at 224 px
# CUDA graphs (train.compile_mode: reduce-overhead) at the paper's batch, where launches dominate:
run 80 bench_step --batch-sizes 64 --modes fast --compile-mode reduce-overhead
run 80 bench_packing --batch-size 64 --repeats 2 --seconds 5

grep -h '^RESULT' "$out_dir"/bench_*.txt | tee "$out_dir/results.txt"
echo "total ${SECONDS}s"
