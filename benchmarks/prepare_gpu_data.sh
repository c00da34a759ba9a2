#!/usr/bin/env bash
# Compact prepared copies of the paper's datasets, and the wheels, for carrying to a GPU box.
#
#   bash benchmarks/prepare_gpu_data.sh            # datasets + wheels (needs ../shared and PyPI)
#   SRC=/tmp/raw OUT=/tmp/prep SIZE=32 WHEELS=0 bash benchmarks/prepare_gpu_data.sh   # tiny dry run
#
# Writes (all ignored through .git/info/exclude, never committed):
#   prepared/brain_binary  brain MRI, tumour vs no tumour, 224 px JPEG q65, + test_dedup   ~45.6 MiB
#   prepared/brain_4class  brain MRI, 4 classes,            224 px JPEG q65, + test_dedup   ~45.6 MiB
#   prepared/chest_xray    chest X-ray, normal/pneumonia,   224 px JPEG q85, + test_dedup   ~46.9 MiB
#   .whl/                  ../shared/gpu-wheels-cp312/*.whl + grad-cam 1.5.7 + ttach     ~10.2 MiB
# A device call carries at most 64 MiB (working tree ~2.6 MiB + .whl + ONE dataset fits; two
# datasets never do). Qualities were chosen to keep each dataset under ~48 MiB; measured
# sizes and the reasoning are in benchmarks/NOTES.md. Stored at 224 px, the model size, so
# the pipeline only decodes (no resize on the box). Greyscale (the build's channels=auto).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${SRC:-../shared/data}
OUT=${OUT:-prepared}
SIZE=${SIZE:-224}
BRAIN_Q=${BRAIN_Q:-65}
CHEST_Q=${CHEST_Q:-85}
WHEELS=${WHEELS:-1}
PY=${PY:-python}
ONLY=${ONLY:-brain_binary,brain_4class,chest_xray}

for p in prepared/ .whl/; do
  grep -qxF "$p" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "$p" >> .git/info/exclude; }
done

build() {  # name dataset label_map quality
  local name=$1 dataset=$2 label_map=$3 q=$4
  [[ ",$ONLY," == *",$name,"* ]] || return 0
  local t0=$SECONDS
  rm -rf "$OUT/$name"
  "$PY" -m data_prep.build --dataset="$dataset" --src="$SRC/$dataset" --out="$OUT/$name" \
    --size="$SIZE" --image_format=jpeg --jpeg_quality="$q" --dedup_test --label_map="$label_map" \
    --workers="${WORKERS:-1}" 2>&1 | grep -E "^prepared|rror" || true
  [[ -f "$OUT/$name/xmedjax_dataset.json" ]] || { echo "build of $name failed" >&2; exit 1; }
  printf '%-14s %6.1f MiB  %4d s\n' "$name" "$(du -sb "$OUT/$name" | awk '{print $1/1048576}')" \
    $((SECONDS - t0))
}

build brain_binary brain_tumor_mri binary "$BRAIN_Q"
build brain_4class brain_tumor_mri multiclass "$BRAIN_Q"
build chest_xray chest_xray binary "$CHEST_Q"

if [[ "$WHEELS" == 1 ]]; then
  mkdir -p .whl
  cp -f ../shared/gpu-wheels-cp312/*.whl .whl/
  # grad-cam 1.5.7 is an sdist only: build a pure-Python wheel. Its other needs (opencv-python-headless,
  # matplotlib, scikit-learn, scipy, tqdm, torch, torchvision) are on the GPU image (KINDS.md);
  # ttach is not.
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps grad-cam==1.5.7 ttach==0.0.3 -d "$tmp"
  "$PY" -m pip wheel -q --no-deps --no-build-isolation "$tmp"/grad_cam-1.5.7.tar.gz -w .whl/
  cp -f "$tmp"/ttach-0.0.3-py3-none-any.whl .whl/
  rm -rf "$tmp"
  printf '%-14s %6.1f MiB\n' ".whl" "$(du -sb .whl | awk '{print $1/1048576}')"
fi
tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
printf '%-14s %6.1f MiB (tracked + untracked-not-ignored files: what every device call sends)\n' \
  "working tree" "$(echo "$tree" | awk '{print $1/1048576}')"
