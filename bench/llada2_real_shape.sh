#!/usr/bin/env bash
# LLaDA2-mini at its real shape (16.25B parameters, random bf16 weights) on the GPU machine: every figure of
# docs/benchmarks.md's "LLaDA2-mini at the real shape", from the repository root:
#
#     GPU_PYTHONPATH=... CPU_PYTHONPATH=... bash bench/llada2_real_shape.sh [STAGE ...]
#
# Stages, in the order given (default: all five):
#   checkpoint  draw the checkpoint into $WORK (31 GB; on the GPU when there is one)
#   int4        the user's `llada-onnx export CKPT OUT --quantize int4` into $WORK, traced on the GPU in fp32 with
#               the 65 GB float graph in --scratch $FAST (memory), validated on the CPU provider
#   quantize    the other way to int4: an fp32 export (65 GB, into $FAST; quantized experts need fp32; not
#               validated here, the int4 stage validates the same trace) -> `llada-onnx quantize` into $WORK,
#               validated against it on the CPU provider; the fp32 export is deleted afterwards
#   gpu         fp16 export for CUDA into $FAST, validated there -> the block step and the full forward against
#               torch bf16 eager and torch.compile (bench.block_step); the fp16 export is deleted afterwards
#   cpu         the int4 export's block step on $THREADS cores -> `llada-onnx chat --threshold 0.95`
# One stage at a time, so that each fits the one-GPU machine (128 GB of memory, 64 GB of disk) and no timing shares
# the machine with other work. GPU_PYTHONPATH / CPU_PYTHONPATH put each stage's onnxruntime first
# (onnxruntime-gpu for `gpu`; onnxruntime >= 1.32, whose CPU MoE kernels route as the model does, for the others).
# CONFIG: the config.json to draw (default: the real mini's). Logs: $WORK/llada2-STAGE.log.
set -uo pipefail
W=${WORK:-.bench}; F=${FAST:-/dev/shm/llada2-bench}; R=${RESULTS:-bench/results}; T=${THREADS:-16}
C=${CONFIG:-bench/configs/llada2-mini.json}; M=$W/llada2; N=$(basename "$C" .json); CKPT=$M/checkpoint
log() { echo "== $(date +%T) $*"; }
timed() { if [ -x /usr/bin/time ]; then /usr/bin/time -f "   [time] %e s wall, peak RSS %M KB" "$@"; else "$@"; fi; }
cuda() { python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; }

checkpoint() {
  export PYTHONPATH=${CPU_PYTHONPATH:-${PYTHONPATH:-}}
  df -h $W $F | tail -n +2
  timed python3 -c "from pathlib import Path; from bench.harness import model_checkpoint; model_checkpoint('llada2', Path('$W'), '$C')" || return 1
  du -sh $CKPT
}

int4() {
  export PYTHONPATH=${CPU_PYTHONPATH:-${PYTHONPATH:-}}
  local device=cpu; cuda && device=cuda
  timed llada-onnx export $CKPT $M/onnx-int4 --quantize int4 --device $device --scratch $F --force || return 1
  du -sh $M/onnx-int4; ls -l $M/onnx-int4; ls -A $F
}

quantize() {
  export PYTHONPATH=${CPU_PYTHONPATH:-${PYTHONPATH:-}}
  local device=cpu; cuda && device=cuda
  timed llada-onnx export $CKPT $F/onnx-fp32 --device $device --no-validate --force || return 1
  du -sh $F/onnx-fp32
  timed llada-onnx quantize $F/onnx-fp32 $M/onnx-int4-quantized --quantize int4 --force || return 1
  du -sh $M/onnx-int4-quantized; cat $M/onnx-int4-quantized/validation.json
  rm -rf $F/onnx-fp32
}

gpu() {
  export PYTHONPATH=${GPU_PYTHONPATH:-${PYTHONPATH:-}}
  cuda || { log no CUDA device: no gpu stage; return 0; }
  timed llada-onnx export $CKPT $F/onnx-fp16 --dtype fp16 --device cuda --force || return 1
  cat $F/onnx-fp16/validation.json
  du -sh $F/onnx-fp16
  python3 -m bench.block_step --config $C --work $W --export $F/onnx-fp16 --provider cuda --batches 1,4 \
      --compile ${COMPILE:-default,reduce-overhead} --out $R/gpu-h200-$N-block-step
  rm -rf $F/onnx-fp16
}

cpu() {
  export PYTHONPATH=${CPU_PYTHONPATH:-${PYTHONPATH:-}}
  python3 -c "from llada_onnx.models.tiny import make_tiny_llada2_checkpoint as m; m('$W/llada2-tiny')"
  llada-onnx export $W/llada2-tiny $W/llada2-tiny-onnx --force > /dev/null 2>&1
  python3 -m bench.block_step --config $C --work $W --no-torch --export $M/onnx-int4 --provider cpu --threads $T \
      --batches 1 --warmup 1 --reps 5 --measure-rate $W/llada2-tiny-onnx --out $R/cpu$T-$N-int4-block-step
  printf 'the king\n\n' | timed llada-onnx chat --model $M/onnx-int4 --threads $T --gen-length 32 --threshold 0.95
}

mkdir -p $M $F $R
for stage in "${@:-checkpoint int4 quantize gpu cpu}"; do
  for s in $stage; do
    log "$s"; $s > $W/llada2-$s.log 2>&1; rc=$?; tail -n 25 $W/llada2-$s.log
    [ $rc = 0 ] || { log "$s failed ($rc)"; exit $rc; }
  done
done
log done
