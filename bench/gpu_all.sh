#!/usr/bin/env bash
# Every GPU throughput measurement of spcxr, in one go, in under 6 minutes on one H100/H200.
#
#   bash bench/gpu_all.sh OUT_DIR                       # on a machine with a CUDA GPU
#   SPCXR_BENCH_SMALL=1 bash bench/gpu_all.sh OUT_DIR   # the same steps, tiny, on the CPU (< 2 min)
#
# Steps (each under `timeout`, and all of them under one budget, SPCXR_BENCH_BUDGET seconds,
# default 340, so one hang cannot eat the rest):
#   store     a synthetic prepared store on local disk (512 images, 256 px), in OUT_DIR/store,
#             unless SPCXR_BENCH_STORE names one that exists
#   compiled  bench/pretrain_throughput.py, ViT-S/16 @ 224, bf16, 256 images (512 views) per
#             step, the full fast path (torch.compile, fused AdamW, side-stream prefetch), with
#             the reference-style pipeline (64 images per step, 15 workers) in the same run
#   eager     the same without torch.compile (with the reference phase only if "compiled" failed)
#   plain     no compile, no prefetch, no fused AdamW: the loop as it was before the fast path
#             (cuDNN autotuning aside, which is always on on CUDA)
#   inference bench/inference_throughput.py --device DEVICE --out-dir OUT_DIR, if that file
#             exists (extra arguments from SPCXR_INFERENCE_ARGS)
# Each writes its JSON line(s) to OUT_DIR/*.jsonl, its output to OUT_DIR/<step>.out/.err; a
# summary (with the issue's targets) is printed at the end and saved as OUT_DIR/summary.txt.
# Needs no network and no data outside the repository.
#
# On the project's lent GPU machines (python3 with torch, timm, torchvision; no spcxr, imagehash
# or pydicom), prepare the store on the CPU machine first, in the git-ignored gpu_data/ (33 MB):
#   python bench/pretrain_throughput.py --store gpu_data/pretrain_store --store-images 512 \
#       --store-size 256 --only-build-store
# then run there, carrying it:  SPCXR_BENCH_STORE=gpu_data/pretrain_store bash bench/gpu_all.sh $OUT
set -u

OUT=${1:?usage: bash bench/gpu_all.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
# The package from this checkout, installed or not (the GPU machine has torch, timm and
# torchvision but not spcxr).
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-$(command -v python || command -v python3)}
BUDGET=${SPCXR_BENCH_BUDGET:-340}
BENCH=bench/pretrain_throughput.py
# A store prepared beforehand (building one needs spcxr's prepare dependencies: imagehash,
# pydicom), else one built here.
STORE=${SPCXR_BENCH_STORE:-$OUT/store}

if [[ "${SPCXR_BENCH_SMALL:-0}" == 1 ]]; then
    # Tiny model and few steps on the CPU: checks the script end to end, not the hardware.
    DEVICE=cpu
    MODEL=(--arch vit_tiny --img-size 64 --patch-size 8 --batch-size 16 --threads 1)
    STEPS=(--steps 3 --warmup 1 --workers 1)
    REF=(--ref-workers 1 --ref-batch-size 8 --ref-warmup 1 --ref-steps 3)
    STORE_ARGS=(--store-images 64 --store-size 96)
    COMPILE=(--no-compile)  # inductor on a small CPU takes minutes (tests/pretrain/test_fastpath.py)
    LIMITS=(60 60 30 30 30)
else
    DEVICE=cuda
    MODEL=(--arch vit_small --img-size 224 --patch-size 16 --batch-size 256)
    STEPS=(--steps 40 --warmup 10 --workers 6)
    REF=(--ref-workers 15 --ref-batch-size 64)  # the issue's reference: 15 workers, batch 64
    STORE_ARGS=(--store-images 512 --store-size 256)
    COMPILE=(--compile --compile-mode default)
    LIMITS=(60 210 60 60 120)
fi

start=$SECONDS
LAST_RC=0
: >"$OUT/steps.txt"
step() {  # step NAME MAX_SECONDS COMMAND...
    local name=$1 max=$2
    shift 2
    local left=$((BUDGET - (SECONDS - start)))
    local limit=$((max < left ? max : left))
    if ((limit < 10)); then
        echo "[gpu_all] $name: skipped, budget spent" | tee -a "$OUT/steps.txt"
        return
    fi
    echo "[gpu_all] $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"
    LAST_RC=$?
    echo "[gpu_all] $name: exit $LAST_RC after $((SECONDS - t0))s" | tee -a "$OUT/steps.txt"
    if ((LAST_RC != 0)); then
        tail -n 5 "$OUT/$name.err"
    fi
}

if [[ -f "$STORE/manifest.parquet" ]]; then
    echo "[gpu_all] store: $STORE exists" | tee -a "$OUT/steps.txt"
else
    step store "${LIMITS[0]}" "$PY" "$BENCH" --device "$DEVICE" --store "$STORE" \
        "${STORE_ARGS[@]}" --only-build-store
fi
step compiled "${LIMITS[1]}" "$PY" "$BENCH" --device "$DEVICE" --store "$STORE" "${MODEL[@]}" \
    "${STEPS[@]}" "${REF[@]}" "${COMPILE[@]}" --tag compiled --out-dir "$OUT"
# Without a compiled run (it failed or timed out), the eager run measures the reference.
EAGER_REF=(--skip-reference)
if ((LAST_RC != 0)); then EAGER_REF=("${REF[@]}"); fi
step eager "${LIMITS[2]}" "$PY" "$BENCH" --device "$DEVICE" --store "$STORE" "${MODEL[@]}" \
    "${STEPS[@]}" "${EAGER_REF[@]}" --no-compile --tag eager --out-dir "$OUT"
step plain "${LIMITS[3]}" "$PY" "$BENCH" --device "$DEVICE" --store "$STORE" "${MODEL[@]}" \
    "${STEPS[@]}" --no-compile --no-prefetch --no-fused --skip-reference --tag plain \
    --out-dir "$OUT"
if [[ -f bench/inference_throughput.py ]]; then
    # shellcheck disable=SC2086  # extra arguments, split on spaces on purpose
    step inference "${LIMITS[4]}" "$PY" bench/inference_throughput.py --device "$DEVICE" \
        --out-dir "$OUT" ${SPCXR_INFERENCE_ARGS:-}
else
    echo "[gpu_all] inference: skipped, bench/inference_throughput.py does not exist" |
        tee -a "$OUT/steps.txt"
fi

"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
"""Summary of the JSON lines in OUT_DIR, with the issue's targets on CUDA."""
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
print(f"gpu_all summary ({out})")
print((out / "steps.txt").read_text().rstrip())
rows = []
for path in sorted(out.glob("*.jsonl")):
    for line in path.read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
fields = [
    "spcxr_views_per_s", "bare_views_per_s", "reference_views_per_s", "spcxr_vs_reference",
    "spcxr_vs_bare", "spcxr_pipeline_views_per_s", "data_wait_frac", "mfu_spcxr",
    "mfu_spcxr_vs_matmul", "matmul_tflops", "peak_memory_gib", "warmup_s",
]
for row in rows:
    name = f"{row.get('bench', '?')}/{row.get('tag', '')}"
    print(f"\n{name} on {row.get('device')} (torch {row.get('torch')})")
    if row.get("bench") != "pretrain_throughput":
        print("  " + json.dumps(row))
        continue
    for key in fields:
        print(f"  {key:28s} {row.get(key)}")
    if row.get("device", "cpu") != "cpu":  # the issue's targets (for the full fast path)
        checks = {
            "end-to-end >= 12,000 views/s": (row["spcxr_views_per_s"] or 0) >= 12000,
            "GPU waits for data < 5% of the time": row["data_wait_frac"] < 0.05,
        }
        if row.get("spcxr_vs_reference") is not None:
            checks[">= 25x the reference-style pipeline"] = row["spcxr_vs_reference"] >= 25
        for what, ok in checks.items():
            print(f"  target {what:40s} {'met' if ok else 'NOT met'}")
if not rows:
    print("no JSON lines were written")
EOF
