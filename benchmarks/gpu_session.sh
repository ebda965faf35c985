#!/usr/bin/env bash
# The GPU checks of a session that is lent a CUDA machine: the CUDA tests, then the benchmark
# against cuDNN in float32 and under bf16 autocast, and the memory at D without CUDA graphs; then
# the LN-LSTM's time and memory with CUDA graph windows of 16 and 64 steps (32 above). Each
# step has a time limit, so that a short lease still brings back what finished; every step's
# output goes to $OUT (default runs/gpu), with a line per step in status.txt. bench_rnn prints
# each shape's rows as it finishes the shape, so a step cut off by its limit still leaves those.
#
#   PYTHONPATH=. bash benchmarks/gpu_session.sh tests     # at most 4.5 minutes (its limits)
#   PYTHONPATH=. bash benchmarks/gpu_session.sh bench     # at most 8 minutes
#   PYTHONPATH=. bash benchmarks/gpu_session.sh windows   # at most 4 minutes
#   PYTHONPATH=. bash benchmarks/gpu_session.sh           # all three: more than one 10-minute call
#
# PYTHON picks the interpreter (default python3: the machine's own torch, triton and pytest).
set -u
cd "$(dirname "$0")/.."
out="${OUT:-runs/gpu}"
py="${PYTHON:-python3}"
what="${1:-all}"
if [[ $what != all && $what != tests && $what != bench && $what != windows ]]; then
  echo "gpu_session.sh: expected tests, bench, windows or nothing (all), got '$what'" >&2
  exit 2
fi
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
triton.__version__, torch.cuda.get_device_name())"
if [[ $what == all || $what == tests ]]; then
  # The CUDA tests compare against the CPU: build the C++ kernels meanwhile (pytest waits on it).
  timeout 240 "$py" -c "from seqnorm.ops import cpp; print(cpp.load())" >"$out/cpp_build.txt" 2>&1 &
  # only the files with CUDA tests: a GPU machine may lack the recipes' dependencies (torchdata)
  step pytest_cuda 240 "$py" -m pytest -m cuda -q -p no:cacheprovider --durations=12 \
      $(grep -l "pytest.mark.cuda" tests/test_*.py)
  wait
fi
if [[ $what == all || $what == bench ]]; then
  step bench_rnn_cuda 120 "$py" benchmarks/bench_rnn.py --device cuda --shapes A C --warmup 1 \
      --repeats 5 --json "$out/bench_rnn_cuda.json"
  # D: the Python loops take about a second a training step here
  step bench_rnn_cuda_D 150 "$py" benchmarks/bench_rnn.py --device cuda --shapes D --warmup 1 \
      --repeats 3 --json "$out/bench_rnn_cuda_D.json"
  # bf16: the fused layers against cuDNN (the Python loops are timed in float32 above)
  fused=("torch.nn.LSTM" "seqnorm LSTM (no norm)" "seqnorm LN-LSTM" "seqnorm GN-LSTM (4 groups)"
      "seqnorm BN-LSTM" "torch.nn.GRU" "seqnorm LN-GRU" "seqnorm GN-GRU (4 groups)")
  step bench_rnn_cuda_bf16 120 "$py" benchmarks/bench_rnn.py --device cuda --autocast bf16 \
      --warmup 1 --repeats 5 --only "${fused[@]}" --json "$out/bench_rnn_cuda_bf16.json"
  # what the CUDA graphs' memory costs: D without them
  step bench_rnn_cuda_D_no_graphs 60 "$py" benchmarks/bench_rnn.py --device cuda --shapes D \
      --cuda-graphs 0 --warmup 1 --repeats 3 --only "${fused[@]}" \
      --json "$out/bench_rnn_cuda_D_no_graphs.json"
fi
if [[ $what == all || $what == windows ]]; then
  # the window trades memory (a graph's copies are a window's steps) for replays and copies
  for steps in 16 64; do
    step "bench_rnn_cuda_window_$steps" 100 "$py" benchmarks/bench_rnn.py --device cuda \
        --shapes A D --window "$steps" --warmup 1 --repeats 3 \
        --only "torch.nn.LSTM" "seqnorm LN-LSTM" --json "$out/bench_rnn_cuda_window_$steps.json"
  done
fi
