#!/usr/bin/env bash
# The one script a device call runs (issue 8): wheels, then benchmarks/gpu.py or
# benchmarks/replicate.py within a time budget; everything worth keeping lands in $OUT.
#
#   bash benchmarks/run_on_gpu.sh PHASE [CALL_SECONDS] [MODELS]
#
# PHASE    what                                                   carry (besides .whl)
# bench    gpu.py: ours vs torch eager / pytorch-grad-cam (~400 s) prepared/brain_binary (input bench)
# brain    brain_densenet121 + brain_resnet50                     prepared/brain_binary
# chest    chest_densenet121 + chest_resnet50                     prepared/chest_xray
# brain4   brain4_densenet121                                     prepared/brain_4class
# four     the paper's four models in one command (the wall-time  prepared/chest_xray, with
#          target); needs brain_binary already on the warm box     brain_binary left by `upload`
# upload   nothing: leaves the carried dataset on the warm box    the dataset to leave there
# cams     xmedjax.compare (every saliency method) on the          prepared/brain_binary
#          brain runs a `brain`/`brain4` call left on the warm box
# profile  jax.profiler trace + XLA dumps of PROFILE_ARCH's          (none needed)
#          PROFILE_PROGRAMS (default densenet121 gradcam_bf16_small) -> $OUT/profile.tar.gz
# CALL_SECONDS: what this call may use (default 570, for timeout_s=600); runs still going at
# CALL_SECONDS - 25 - 60 get SIGTERM (they checkpoint), and their best checkpoint so far is
# evaluated and marked "preempted". MODELS overrides the phase's models; PARALLEL (default 2)
# sets how many train at once on the one GPU; TORCH_COMPILE=1 adds torch.compile to bench.
#
# One dataset per call: working tree ~2.6 + .whl ~10.2 + dataset <= 46.9 MiB < 64 MiB; two
# datasets never fit. Ignored paths left by an earlier call on a warm machine stay there
# (/tmp/site, .jax_cache/, runs/, prepared/<other>), which `four` relies on: call `upload`
# with prepared/brain_binary, then `four` with prepared/chest_xray, within 30 s of each other.
# After each call copy <files_at>/results.json to docs/results.json here (the next call
# carries it and merges into it).
#
# Session plan (15 min of device time each; machine start ~2-3 min; give_back after the last call):
#  A (benchmarks): run(command="bash benchmarks/run_on_gpu.sh bench 570", timeout_s=600,
#                      carry=[".whl", "prepared/brain_binary"])                      ~6-8 min
#     then at once, on the largest missed target (default: DenseNet121 Grad-CAM bs32):
#     run(command="PROFILE_ARCH=densenet121 PROFILE_PROGRAMS=gradcam_bf16_small bash benchmarks/run_on_gpu.sh profile 200",
#         timeout_s=230, carry=[".whl"])                                              ~2-3 min
#  B (replication): run(command="bash benchmarks/run_on_gpu.sh upload", timeout_s=120,
#                       carry=[".whl", "prepared/brain_binary"]), then within 30 s
#     run(command="bash benchmarks/run_on_gpu.sh four 570", timeout_s=600,
#         carry=[".whl", "prepared/chest_xray"])                                     ~11-12 min
#  C (open question 3 + CAMs): run(command="bash benchmarks/run_on_gpu.sh brain4 420", timeout_s=450,
#         carry=[".whl", "prepared/brain_4class"]); then
#     run(command="bash benchmarks/run_on_gpu.sh cams 150", timeout_s=180, carry=[".whl"])
# If a session must also replicate after A: `bash benchmarks/run_on_gpu.sh brain 240 brain_resnet50`
# (the cheapest model first), carry=[".whl", "prepared/brain_binary"].
set -uo pipefail
cd "$(dirname "$0")/.."
PHASE=${1:-bench}
CALL_S=${2:-570}
MODELS=${3:-}
OUT=${OUT:-/tmp/xmedjax_out}
mkdir -p "$OUT"
T0=$SECONDS
say() { echo "[run_on_gpu $(date -u +%H:%M:%S) +$((SECONDS - T0))s] $*"; }

# DRY=1: check this script on a CPU host (no wheels, tiny --dry_run of both scripts)
DRYARGS=()
if [[ ${DRY:-0} == 1 ]]; then
  DRYARGS=(--dry_run)
  python3() { "${PY:-python}" "$@"; }
  nvidia-smi() { echo "(no nvidia-smi: DRY=1)"; }
fi

# 1. wheels (grain, tensorflow-datasets, array-record, ml-collections + deps, grad-cam 1.5.7, ttach)
if [[ ${DRY:-0} == 1 ]]; then :
elif ! PYTHONPATH=/tmp/site python3 -c "import grain, tensorflow_datasets, ml_collections, array_record, pytorch_grad_cam" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { say "wheel install failed"; exit 3; }
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import jax, flax, optax, torch, torchvision, cv2, grain; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'cv2', cv2.__version__, 'grain', grain.__version__ if hasattr(grain, '__version__') else '?')"
  nproc; free -g | head -2; du -sh prepared/* 2>/dev/null; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
say "wheels ready"

CACHE=$PWD/.jax_cache   # ignored; kept between calls on a warm machine
RESULTS=${RESULTS:-docs/results.json}
BENCH_JSON=$OUT/benchmarks.json

run_bench() {
  local budget=$1 data=""
  for d in prepared/brain_binary prepared/chest_xray prepared/brain_4class; do
    [[ -f $d/xmedjax_dataset.json ]] && { data=$d; break; }
  done
  say "gpu.py (budget ${budget} s, input data '${data}')"
  local tc=()
  [[ ${TORCH_COMPILE:-0} == 1 ]] && tc=(--torch_compile)
  python3 benchmarks/gpu.py --out="$BENCH_JSON" --data_dir="$data" --cache_dir="$CACHE" \
    --budget_s="$budget" "${tc[@]}" "${DRYARGS[@]}" ${DRY_BENCH_ARGS:-} 2>&1 | grep --line-buffered -v -E "^(W|I)[0-9]{4} " | tee "$OUT/gpu_log.txt"
  say "gpu.py done"
}

run_repl() {
  local models=$1 budget=$((CALL_S - (SECONDS - T0) - 25))
  if (( budget < 60 )); then say "no time left for the replication ($budget s)"; return; fi
  local bench=()
  [[ -f $BENCH_JSON ]] && bench=(--bench_json="$BENCH_JSON")
  say "replicate.py $models (budget ${budget} s, ${PARALLEL:-2} at once)"
  python3 benchmarks/replicate.py --data_root=prepared --models="$models" --parallel="${PARALLEL:-2}" \
    --budget_s="$budget" --cache_dir="$CACHE" --out="$RESULTS" "${bench[@]}" "${DRYARGS[@]}" ${DRY_REPL_ARGS:-} 2>&1 \
    | grep --line-buffered -v -E "^(W|I)[0-9]{4} " | tee "$OUT/replicate_log.txt"
  cp "$RESULTS" "$OUT/results.json"
  # each run's log tail, metrics, figures and report in one archive (the $OUT file limit is 8)
  for m in ${models//,/ }; do
    [[ -f runs/replicate/$m/replicate_log.txt ]] || continue
    { echo "=== $m"; grep -v -E "^(W|I)[0-9]{4} " "runs/replicate/$m/replicate_log.txt" | tail -c 20000; } >> "$OUT/runs.log"
  done
  tar czf "$OUT/runs_${PHASE}.tar.gz" --exclude='checkpoints' --exclude='heatmaps' --exclude='predictions' \
    --exclude='tensorboard' runs/replicate 2>/dev/null
  say "replicate.py done"
}

case $PHASE in
  bench)  run_bench $((CALL_S - 60)) ;;
  brain)  run_repl "${MODELS:-brain_densenet121,brain_resnet50}" ;;
  chest)  run_repl "${MODELS:-chest_densenet121,chest_resnet50}" ;;
  brain4) run_repl "${MODELS:-brain4_densenet121}" ;;
  four)   run_repl "${MODELS:-brain_densenet121,chest_densenet121,brain_resnet50,chest_resnet50}" ;;
  upload) say "left on this machine: $(ls prepared)" ;;
  profile)  # one or two of our programs: jax.profiler trace (top ops printed) + XLA HLO dumps, fresh cache
    rm -rf /tmp/prof /tmp/xla_dump /tmp/prof_cache
    XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=/tmp/xla_dump --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*(train_step|grad_cam|eval_step).*" \
      python3 benchmarks/gpu.py --only="${PROFILE_ARCH:-densenet121},ours" --cold_compile=false \
      --programs="${PROFILE_PROGRAMS:-gradcam_bf16_small}" --cache_dir=/tmp/prof_cache --profile_dir=/tmp/prof \
      --out="$OUT/profile.json" "${DRYARGS[@]}" 2>&1 | grep --line-buffered -v -E "^(W|I)[0-9]{4} " \
      | tee "$OUT/profile_log.txt"
    tar czf "$OUT/profile.tar.gz" -C /tmp prof xla_dump 2>/dev/null
    if (( $(stat -c %s "$OUT/profile.tar.gz") > 15000000 )); then  # the $OUT per-file limit is 16 MiB
      tar czf "$OUT/profile.tar.gz" -C /tmp --exclude='*before_optimizations*' --exclude='*.ll' --exclude='*.ptx' --exclude='*.o' --exclude='*.cubin' prof xla_dump 2>/dev/null
    fi
    say "profile: $(du -h "$OUT/profile.tar.gz" | cut -f1)" ;;
  cams)   # the CAM-method comparison on the brain test set, from the brain runs left on the warm box
    wds=$(ls -d runs/replicate/brain_resnet50 runs/replicate/brain_densenet121 runs/replicate/brain4_densenet121 2>/dev/null | paste -sd, -)
    if [[ -z $wds ]]; then say "no brain runs on this machine: run the brain phase first"; else
      say "xmedjax.compare on $wds"
      timeout $((CALL_S - (SECONDS - T0) - 15)) python3 -m xmedjax.compare --workdirs="$wds" \
        --split=test --images="${CAM_IMAGES:-64}" --out="$OUT/cam_comparison_brain.md" 2>&1 \
        | grep --line-buffered -v -E "^(W|I)[0-9]{4} " | tee "$OUT/cams_log.txt"
    fi ;;
  *) echo "unknown phase $PHASE (bench | brain | chest | brain4 | four | upload | cams | profile)"; exit 2 ;;
esac
if [[ -f $BENCH_JSON && ! -f $OUT/results.json ]]; then
  python3 - "$BENCH_JSON" "$OUT/results.json" "$RESULTS" <<'EOF'
import json, sys
b = json.load(open(sys.argv[1]))
try:
    r = json.load(open(sys.argv[3]))
except Exception:
    r = {}
r["benchmarks"], r["benchmarks_meta"] = b.get("benchmarks", {}), b.get("meta", {})
r.setdefault("replication", {})
json.dump(r, open(sys.argv[2], "w"), indent=2)
EOF
fi
say "phase $PHASE done; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
