#!/usr/bin/env bash
# LLaDA-MoE-7B-A1B at its real shape (7.35B parameters, random bf16 weights) on a GPU machine: the figures of
# docs/benchmarks.md's "LLaDA-MoE at the real shape", from the repository root:
#
#     GPU_PYTHONPATH=... CPU_PYTHONPATH=... bash bench/moe_real_shape.sh
#
# After the checkpoint is written (drawn on the GPU), two lanes run at once:
#   GPU: fp16 fused export with the KV-cache graph (validated on CUDA) -> the int4 export for CUDA (experts in the
#        CUDA kernel's layout, validated on CUDA) -> one forward of each (bench.forward) -> their KV-cached steps
#        (bench.cache_step) -> fast decoding end to end in fp16 (bench.fast_decoding)
#   CPU: the user's `llada-onnx export CKPT OUT --quantize int4 --cache` at --block-size $BLOCK -> `llada-onnx chat`
# GPU_PYTHONPATH / CPU_PYTHONPATH put each lane's onnxruntime first (onnxruntime-gpu; onnxruntime >= 1.32, whose
# CPU MoE kernels route as the model does). Float graphs of the quantized exports are written to $SCRATCH.
# Needs about 40 GB of disk, and 100 GB of RAM with $SCRATCH in /dev/shm (one H200 machine).
set -uo pipefail
W=${WORK:-.bench}; R=${RESULTS:-bench/results}; T=${THREADS:-16}; B=${BLOCK:-64}; S=${SCRATCH:-/dev/shm}
M=$W/moe-7b; CKPT=$M/checkpoint
log() { echo "== $(date +%T) $*"; }
timed() { /usr/bin/time -f "   [time] %e s wall, peak RSS %M KB" "$@"; }

log checkpoint
timed python3 -c "from pathlib import Path; from bench.harness import model_checkpoint; model_checkpoint('moe-7b', Path('$W'))" || exit 1
du -sh $CKPT

gpu_lane() {
  export PYTHONPATH=${GPU_PYTHONPATH:-${PYTHONPATH:-}}
  log export fp16; timed llada-onnx export $CKPT $M/onnx-fp16-ort --dtype fp16 --device cuda --fusion ort --cache --force
  log export int4 for CUDA; timed llada-onnx export $CKPT $M/onnx-int4-cuda --dtype fp16 --device cuda --fusion ort \
      --quantize int4 --cache --scratch $S --force
  du -sh $M/onnx-fp16-ort $M/onnx-int4-cuda
  log forward; python3 -m bench.forward --models moe-7b --work $W --no-torch --export $M/onnx-fp16-ort \
      --export $M/onnx-int4-cuda --provider cuda --batches 1,4 --out $R/gpu-h200-moe-7b-forward-int4
  for e in fp16-ort int4-cuda; do
    log cache step $e; python3 -m bench.cache_step --export $M/onnx-$e --provider cuda --lengths 320 --reps 20 \
        --out $R/gpu-h200-moe-7b-$e-cache-step
  done
  log fast decoding; python3 -m bench.fast_decoding --export $M/onnx-fp16-ort --provider cuda --gens 256 --reps 3 \
      --prompts 1 --rules "exact,threshold 0.9" --caches none,dual --out $R/gpu-h200-moe-7b-fast-decoding
  log gpu lane done
}

cpu_lane() {
  export PYTHONPATH=${CPU_PYTHONPATH:-${PYTHONPATH:-}}
  log export int4-b$B --cache; timed llada-onnx export $CKPT $M/onnx-int4-b$B --quantize int4 --block-size $B --cache \
      --scratch $S --force
  du -sh $M/onnx-int4-b$B; du -b $M/onnx-int4-b$B/*.data
  log chat; printf 'the king\n\n' | timed llada-onnx chat --model $M/onnx-int4-b$B --threads $T --gen-length 32
  log cpu lane done
}

# Each lane on its own cores (where there are 32), so that neither lane's timings share cores with the other's work
pin_gpu=() pin_cpu=()
if [ "$(nproc)" -ge 32 ]; then pin_gpu=(taskset -c 0-7) pin_cpu=(taskset -c 8-31); fi
"${pin_gpu[@]}" bash -c "$(declare -f log timed gpu_lane); W=$W R=$R S=$S M=$M CKPT=$CKPT gpu_lane" > $W/moe-7b-gpu.log 2>&1 &
"${pin_cpu[@]}" bash -c "$(declare -f log timed cpu_lane); W=$W R=$R T=$T B=$B S=$S M=$M CKPT=$CKPT cpu_lane" > $W/moe-7b-cpu.log 2>&1 &
wait
log done
