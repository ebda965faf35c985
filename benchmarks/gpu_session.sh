#!/usr/bin/env bash
# The GPU checks of a session that is lent a CUDA machine, as one script that fits one device
# call (under 10 minutes): the CUDA tests, the benchmark against cuDNN in float32 and under bf16
# autocast, and the memory at D without CUDA graphs. Each step has a time limit, so that a short
# lease still brings back what finished; every step's output goes to $OUT (default runs/gpu), with
# a line per step in status.txt. bench_rnn prints each row as it is measured, so a step cut off by
# its limit still leaves the rows it finished.
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

step device 30 "$py" -c "import torch, triton; print(torch.__version__, torch.version.cuda, \
triton.__version__, torch.cuda.get_device_name()); import os; os.system('nvidia-smi')"
# The CUDA tests compare against the CPU: build the C++ kernels meanwhile (pytest waits on it).
timeout 240 "$py" -c "from seqnorm.ops import cpp; print(cpp.load())" >"$out/cpp_build.txt" 2>&1 &
step pytest_cuda 200 "$py" -m pytest -m cuda -q -p no:cacheprovider --durations=12
wait
step bench_rnn_cuda 160 "$py" benchmarks/bench_rnn.py --device cuda --warmup 1 --repeats 5 \
    --json "$out/bench_rnn_cuda.json"
# bf16: the fused layers against cuDNN (the Python loops are timed in float32 above)
fused=("torch.nn.LSTM" "seqnorm LSTM (no norm)" "seqnorm LN-LSTM" "seqnorm GN-LSTM (4 groups)"
    "seqnorm BN-LSTM" "torch.nn.GRU" "seqnorm LN-GRU" "seqnorm GN-GRU (4 groups)")
step bench_rnn_cuda_bf16 120 "$py" benchmarks/bench_rnn.py --device cuda --autocast bf16 \
    --warmup 1 --repeats 5 --only "${fused[@]}" --json "$out/bench_rnn_cuda_bf16.json"
# what the CUDA graphs' memory costs: D without them
step bench_rnn_cuda_D_no_graphs 60 "$py" benchmarks/bench_rnn.py --device cuda --shapes D \
    --cuda-graphs 0 --warmup 1 --repeats 3 --only "${fused[@]}" \
    --json "$out/bench_rnn_cuda_D_no_graphs.json"
