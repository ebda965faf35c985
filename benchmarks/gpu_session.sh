#!/usr/bin/env bash
# The GPU checks of a session that is lent a CUDA machine, as one script: the CUDA tests, then
# the benchmark against cuDNN in float32 and under bf16 autocast. Each step has a time limit, so
# that a short lease still brings back what finished; every step's output goes to $OUT (default
# runs/gpu), with a line per step in status.txt.
#
#   PYTHONPATH=. bash benchmarks/gpu_session.sh            # from the repository's root
#
# PYTHON picks the interpreter (default python3: the machine's own torch, triton and pytest).
set -u
cd "$(dirname "$0")/.."
out="${OUT:-runs/gpu}"
py="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:-.}"

step() {  # step NAME SECONDS COMMAND...: runs COMMAND into $out/NAME.txt, notes its exit status
  local name=$1 seconds=$2
  shift 2
  local start=$SECONDS
  timeout "$seconds" "$@" >"$out/$name.txt" 2>&1
  echo "$name: exit $? after $((SECONDS - start)) s (limit $seconds s)" | tee -a "$out/status.txt"
}

step device 60 "$py" -c "import torch, triton; print(torch.__version__, torch.version.cuda, \
triton.__version__, torch.cuda.get_device_name())"
step pytest_cuda 300 "$py" -m pytest -m cuda -q -p no:cacheprovider
step bench_rnn_cuda 180 "$py" benchmarks/bench_rnn.py --device cuda --warmup 1 --repeats 5 \
    --json "$out/bench_rnn_cuda.json"
step bench_rnn_cuda_bf16 180 "$py" benchmarks/bench_rnn.py --device cuda --autocast bf16 \
    --warmup 1 --repeats 5 --json "$out/bench_rnn_cuda_bf16.json"
