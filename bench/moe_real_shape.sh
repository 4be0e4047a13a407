#!/usr/bin/env bash
# LLaDA-MoE-7B-A1B at its real shape (7.35B parameters, random bf16 weights) on a GPU machine: every figure of
# docs/benchmarks.md's "LLaDA-MoE at the real shape", from the repository root:
#
#     GPU_PYTHONPATH=... CPU_PYTHONPATH=... bash bench/moe_real_shape.sh
#
# After the checkpoint is written (drawn on the GPU), two lanes run at once:
#   GPU: fp16 fused export for CUDA (validated there) -> one forward against torch bf16 eager and torch.compile
#        (bench.forward)
#   CPU: the user's `llada-onnx export CKPT OUT --quantize int4 --cache` -> the same export at MatMulNBits
#        accuracy level 4 -> one forward and the KV-cached steps on $THREADS cores -> `llada-onnx chat`
# GPU_PYTHONPATH / CPU_PYTHONPATH put each lane's onnxruntime first (onnxruntime-gpu; onnxruntime >= 1.32, whose
# CPU MoE kernels route as the model does). Needs about 90 GB of disk and 80 GB of RAM (the nvidia-h200-x2 kind).
set -uo pipefail
W=${WORK:-.bench}; R=${RESULTS:-bench/results}; T=${THREADS:-16}
M=$W/moe-7b; CKPT=$M/checkpoint
log() { echo "== $(date +%T) $*"; }
timed() { /usr/bin/time -f "   [time] %e s wall, peak RSS %M KB" "$@"; }

log checkpoint
timed python3 -c "from pathlib import Path; from bench.harness import model_checkpoint; model_checkpoint('moe-7b', Path('$W'))" || exit 1
du -sh $CKPT

gpu_lane() {
  export PYTHONPATH=${GPU_PYTHONPATH:-${PYTHONPATH:-}}
  log export fp16; timed llada-onnx export $CKPT $M/onnx-fp16-ort --dtype fp16 --device cuda --fusion ort --force
  log forward; python3 -m bench.forward --models moe-7b --work $W --export $M/onnx-fp16-ort --provider cuda \
      --batches 1,4 --out $R/gpu-h200-moe-7b-forward
  du -sh $M/onnx-fp16-ort
  log gpu lane done
}

cpu_lane() {
  export PYTHONPATH=${CPU_PYTHONPATH:-${PYTHONPATH:-}}
  log export int4 --cache; timed llada-onnx export $CKPT $M/onnx-int4 --quantize int4 --cache --force
  du -sh $M/onnx-int4
  python3 -m bench.accuracy_level $M/onnx-int4 $M/onnx-int4-acc4 4
  log cpu forward; python3 -m bench.forward --models moe-7b --work $W --no-torch --export $M/onnx-int4 \
      --export $M/onnx-int4-acc4 --provider cpu --threads $T --batches 1 --warmup 1 --reps 5 \
      --out $R/cpu$T-moe-7b-int4-forward
  log cpu cache step; python3 -m bench.cache_step --export $M/onnx-int4 --provider cpu --threads $T --lengths 320 \
      --reps 5 --out $R/cpu$T-moe-7b-int4-cache-step
  log chat; printf 'the king\n\n' | timed llada-onnx chat --model $M/onnx-int4 --threads $T --gen-length 32
  log cpu lane done
}

# Each lane on its own cores (where there are 32), so that neither lane's timings share cores with the other's work
pin_gpu=() pin_cpu=()
if [ "$(nproc)" -ge 32 ]; then pin_gpu=(taskset -c 0-7) pin_cpu=(taskset -c 8-31); fi
"${pin_gpu[@]}" bash -c "$(declare -f log timed gpu_lane); W=$W R=$R M=$M CKPT=$CKPT gpu_lane" > $W/moe-7b-gpu.log 2>&1 &
"${pin_cpu[@]}" bash -c "$(declare -f log timed cpu_lane); W=$W R=$R T=$T M=$M CKPT=$CKPT cpu_lane" > $W/moe-7b-cpu.log 2>&1 &
wait
log done
