#!/usr/bin/env bash
# LLaDA2-mini at its real shape (16.25B parameters, random bf16 weights) on a GPU machine: every figure of
# docs/benchmarks.md's "LLaDA2-mini at the real shape", from the repository root:
#
#     GPU_PYTHONPATH=... CPU_PYTHONPATH=... bash bench/llada2_real_shape.sh
#
# After the checkpoint is written (drawn on the GPU), two lanes run at once:
#   GPU: fp16 export for CUDA (validated there) -> the block step and the full forward against torch bf16 eager
#        and torch.compile (bench.block_step)
#   CPU: the user's `llada-onnx export CKPT OUT --quantize int4` -> the block step on $THREADS cores ->
#        `llada-onnx chat --threshold 0.95`
# GPU_PYTHONPATH / CPU_PYTHONPATH put each lane's onnxruntime first (onnxruntime-gpu; onnxruntime >= 1.32, whose
# CPU MoE kernels route as the model does). CONFIG: the config.json to draw (default: the real mini's).
# Disk: the int4 export traces an fp32 graph (65 GB) before quantizing it, so the checkpoint and the fp16 export
# (32.5 GB each) go to FAST (default /dev/shm: memory); needs about 90 GB of disk and 200 GB of RAM
# (the nvidia-h200-x2 kind).
set -uo pipefail
W=${WORK:-.bench}; F=${FAST:-/dev/shm/llada2-bench}; R=${RESULTS:-bench/results}; T=${THREADS:-16}
C=${CONFIG:-bench/configs/llada2-mini.json}; M=$W/llada2; N=$(basename "$C" .json)
log() { echo "== $(date +%T) $*"; }
timed() { /usr/bin/time -f "   [time] %e s wall, peak RSS %M KB" "$@"; }

mkdir -p $M $F
log checkpoint; df -h $W $F | tail -n +2
PYTHONPATH=${GPU_PYTHONPATH:-${PYTHONPATH:-}} timed python3 -c "from pathlib import Path; from bench.harness import model_checkpoint; model_checkpoint('llada2', Path('$F'), '$C')" || exit 1
CKPT=$F/llada2/checkpoint; du -sh $CKPT

gpu_lane() {
  export PYTHONPATH=${GPU_PYTHONPATH:-${PYTHONPATH:-}}
  log export fp16; timed llada-onnx export $CKPT $F/onnx-fp16 --dtype fp16 --device cuda --force
  du -sh $F/onnx-fp16
  log block step; python3 -m bench.block_step --config $C --work $F --export $F/onnx-fp16 --provider cuda \
      --batches 1,4 --compile ${COMPILE:-default,reduce-overhead} --out $R/gpu-h200-$N-block-step
  log gpu lane done
}

cpu_lane() {
  export PYTHONPATH=${CPU_PYTHONPATH:-${PYTHONPATH:-}}
  log export int4; timed llada-onnx export $CKPT $M/onnx-int4 --quantize int4 --force
  du -sh $M/onnx-int4; ls -l $M/onnx-int4
  log tiny rate; python3 -c "from llada_onnx.models.tiny import make_tiny_llada2_checkpoint as m; m('$W/llada2-tiny')"
  llada-onnx export $W/llada2-tiny $W/llada2-tiny-onnx --force > /dev/null 2>&1
  log cpu block step; python3 -m bench.block_step --config $C --work $F --no-torch --export $M/onnx-int4 \
      --provider cpu --threads $T --batches 1 --warmup 1 --reps 5 \
      --measure-rate $W/llada2-tiny-onnx --out $R/cpu$T-$N-int4-block-step
  log chat; printf 'the king\n\n' | timed llada-onnx chat --model $M/onnx-int4 --threads $T --gen-length 32 \
      --threshold 0.95
  log cpu lane done
}

# Each lane on its own cores (where there are 32), so that neither lane's timings share cores with the other's work
pin_gpu=() pin_cpu=()
if [ "$(nproc)" -ge 32 ]; then pin_gpu=(taskset -c 0-7) pin_cpu=(taskset -c 8-31); fi
lanes=(cpu)
python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" && lanes+=(gpu)
for lane in "${lanes[@]}"; do
  pin="pin_$lane[@]"
  "${!pin}" bash -c "$(declare -f log timed ${lane}_lane); W=$W F=$F R=$R T=$T C=$C M=$M N=$N CKPT=$CKPT COMPILE=${COMPILE:-} ${lane}_lane" \
      > $W/llada2-$lane.log 2>&1 &
done
wait
log done
