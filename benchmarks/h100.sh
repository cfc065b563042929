#!/usr/bin/env bash
# The GPU measurements of the 1.1B recipe, in parts that each take under ten minutes on one H100.
#
#   bash benchmarks/h100.sh data       # on any machine: the token folder the parity run reads
#   bash benchmarks/h100.sh env        # GPU, torch, CUDA, cuDNN, flash-attn and torchao versions
#   bash benchmarks/h100.sh levers-1   # plain, attention kernels, fused AdamW, FSDP2, micro batch
#   bash benchmarks/h100.sh levers-2   # compile, compiled loss, chunked loss, checkpointing, float8
#   bash benchmarks/h100.sh combined "--fsdp --compile --compile_loss --fused_adamw on"
#   bash benchmarks/h100.sh parity   "--fsdp --compile --compile_loss --fused_adamw on"
#   bash benchmarks/h100.sh fit ["--model.compile true ..."]   `tinytrain fit` itself, the 1.1B recipe
#   bash benchmarks/h100.sh plan                               `tinytrain plan --measure` on the 1.1B recipe
#
# Results go to $RESULTS/<part>-$TAG.json (benchmarks/results/...-h100.json); each JSON holds the
# exact command it ran. The shape can be changed from the environment (PRESET, SEQ, MICRO_BATCH,
# ACCUM, STEPS, WARMUP, PARITY_STEPS, REFERENCE_MICRO_BATCH, DATA, CORPUS, VOCAB, TAG, PYTHON), so
# the same parts run on CPU with the ci preset in the tests before an H100 is spent on them.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-benchmarks/results}
TAG=${TAG:-h100}
PY=${PYTHON:-python3}
SHAPE=(--preset "${PRESET:-tinyllama-1.1b}" --micro_batch "${MICRO_BATCH:-8}" --accum "${ACCUM:-2}")
if [[ -n ${SEQ:-} ]]; then SHAPE+=(--seq "$SEQ"); fi
BASE=("${SHAPE[@]}" --steps "${STEPS:-10}" --warmup "${WARMUP:-3}")
DATA=${DATA:-benchmarks/data/parity}

case "${1:-}" in
  data)
    # This Python's standard library with an 8,000-piece BPE: 3.6M tokens, enough for 50 steps of
    # 16 x 2,048 tokens in one epoch (ids < 8,000 fit the 32,000-row embedding).
    corpus=${CORPUS:-$($PY -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")}
    $PY -m tinytrain prepare --corpus "$corpus" --out "$DATA" --vocab_size "${VOCAB:-8000}" ;;
  env)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || echo "no nvidia-smi"
    $PY - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
else:
    print("gpu none: CUDA is not available")
for name in ("flash_attn", "torchao", "lightning", "triton"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:
        print(name, "not importable:", type(e).__name__, e)
EOF
    ;;
  levers-1)
    $PY -m benchmarks.levers --timeout 400 --out "$RESULTS/levers-1-$TAG.json" \
      --only plain sdpa-flash sdpa-cudnn sdpa-efficient flash-attn fused-adamw fsdp micro-4 micro-16 -- "${BASE[@]}" ;;
  levers-2)
    $PY -m benchmarks.levers --timeout 400 --out "$RESULTS/levers-2-$TAG.json" \
      --only plain compile compile+loss chunked-loss activation-checkpointing float8 -- "${BASE[@]}" ;;
  combined)
    $PY -m benchmarks.throughput "${BASE[@]}" ${2:?the switches to combine} --out "$RESULTS/throughput-$TAG.json" ;;
  parity)
    $PY -m benchmarks.loss_parity --data "$DATA" "${SHAPE[@]}" --steps "${PARITY_STEPS:-50}" \
      --fast="${2:?the fast switches}" --reference --reference_micro_batch "${REFERENCE_MICRO_BATCH:-2}" \
      --out "$RESULTS/loss_parity-$TAG.json" ;;
  fit)
    # The product path: the recipe through Lightning, FSDP2 over one GPU, the loader, MFU from its logs.
    # Global batch = 2 micro-batches, so a step is seconds; ${2:-} adds recipe switches.
    $PY -m benchmarks.fit_speed --recipe "${RECIPE:-recipes/tinyllama-1.1b.yaml}" --data "$DATA" \
      --steps "${STEPS:-10}" --skip "${WARMUP:-3}" --out "$RESULTS/fit_speed-$TAG.json" -- \
      --trainer.devices 1 --data.sources null --data.micro_batch_size "${MICRO_BATCH:-8}" \
      --data.global_batch_size "$(( ${MICRO_BATCH:-8} * ${ACCUM:-2} ))" ${2:-} ;;
  plan)
    $PY -m tinytrain plan --config "${RECIPE:-recipes/tinyllama-1.1b.yaml}" --world_size 1 \
      --data.micro_batch_size "${MICRO_BATCH:-8}" --data.global_batch_size "$(( ${MICRO_BATCH:-8} * ${ACCUM:-2} ))" \
      --measure | tee "$RESULTS/plan-$TAG.txt" ;;
  *)
    sed -n '2,16p' "$0"; exit 2 ;;
esac
