#!/usr/bin/env bash
# LLaDA-8B's shape (random bf16 weights; bench/configs/llada-8b-instruct/config.json, the official config) on the
# GPU machine against torch eager and torch.compile: the figures of docs/benchmarks.md's "GPU: against
# torch.compile", from the repository root:
#
#     PYTHONPATH=<onnxruntime-gpu>:<project> [LAYERS=N] bash bench/llada_8b_gpu.sh [STAGE ...]
#
# LAYERS=N keeps N of the 32 layers (same width; the GPU stages' checkpoint, export and results get an "-Nl" suffix):
# the per-layer picture in a fraction of the time (the 8B checkpoint and export take about 9 minutes).
# Stages, in the order given (default: all five GPU stages; cpu-quant only when named):
#   checkpoint  draw the checkpoint into $WORK (16 GB)
#   export      fp16 `--fusion ort` export for CUDA with its KV-cache graphs (unvalidated: the same graphs as the
#               validated 8B exports; only how the runtime launches them is measured here)
#   forward     one exact-sampler forward, canvas 320, batch 1 and 4 (bench.forward): torch bf16 eager,
#               torch.compile (default, reduce-overhead), the runtime replayed as a CUDA graph and kernel by kernel;
#               each engine's kernels grouped by what they do (--profile)
#   run         whole generations (gen 256, 256 steps, block 32; bench.run): tokens/s against torch eager and
#               torch.compile (reduce-overhead)
#   step        the dual-cache step at canvas 1088, block 32 (bench.cache_step) and torch.compile's step of the same
#               algorithm (bench.step_floor --compile), both replayed as CUDA graphs, with their kernel profiles, and
#               the step's attention alone in the cache graph's two forms (bench.cached_attention)
#   cpu-quant   the CPU at 16 threads: fp32, int8, int4 and int4 at accuracy level 4 (int8 dot products: AVX-512
#               VNNI / AMX) at the 8B width with 2 of its 32 layers (bench.quantization: size, step, agreement)
# Logs: $WORK/8b[-Nl]-STAGE.log.
set -uo pipefail
W=${WORK:-.bench}; R=${RESULTS:-bench/results}; C=${CONFIG:-bench/configs/llada-8b-instruct/config.json}
L=${LAYERS:-}; T=8b${L:+-${L}l}; M=$W/$T
log() { echo "== $(date +%T) $*"; }
timed() { if [ -x /usr/bin/time ]; then /usr/bin/time -f "   [time] %e s wall, peak RSS %M KB" "$@"; else "$@"; fi; }

checkpoint() {
  timed python3 -c "from pathlib import Path; from bench.harness import model_checkpoint; model_checkpoint('8b', Path('$W'), '$C', ${L:-None})"
}

export_fp16() {
  timed llada-onnx export $M/checkpoint $M/onnx-fp16-ort --dtype fp16 --device cuda --fusion ort --cache --no-validate --force
}

forward() {
  python3 -m bench.forward --models 8b --config $C ${L:+--n-layers $L} --work $W --export $M/onnx-fp16-ort \
      --provider cuda --batches 1,4 --compile default,reduce-overhead --profile --out $R/gpu-h200-$T-forward
}

run() {
  python3 -m bench.run --models 8b --config $C ${L:+--n-layers $L} --work $W --provider cuda --fusion ort \
      --settings 256 --batches 1 --reps 2 --compile reduce-overhead --out $R/gpu-h200-$T-run
}

step() {
  python3 -m bench.cache_step --export $M/onnx-fp16-ort --provider cuda --lengths 1088 --profile \
      --out $R/gpu-h200-$T-cache-step &&
  python3 -m bench.step_floor --config $C ${L:+--n-layers $L} --device cuda --length 1088 --compile --profile \
      --out $R/gpu-h200-$T-step-floor &&
  python3 -m bench.cached_attention --config $C ${L:+--n-layers $L} --provider cuda --out $R/gpu-h200-$T-cached-attention
}

cpu_quant() {
  python3 -m bench.quantization --models 8b --config $C --work $W --n-layers 2 --threads 16 \
      --variants fp32,fp32-int8,fp32-int4-b32,fp32-int4-b32-acc4 --reps 7 --out $R/quantization-cpu16-h200-8b-2l
}

mkdir -p $W $R
for stage in "${@:-checkpoint export forward run step}"; do
  for s in $stage; do
    f=${s//-/_}; [ $s = export ] && f=export_fp16
    log "$s"; $f > $W/$T-$s.log 2>&1; rc=$?; tail -n 30 $W/$T-$s.log
    [ $rc = 0 ] || { log "$s failed ($rc)"; exit $rc; }
  done
done
log done
