#!/bin/bash
# One prepared run for a bare GPU host (a borrowed machine, a fresh cloud VM): install the carried
# wheels, check every import, run the GPU suite, then optionally an IMDB experiment: an in-domain
# LM, its curve fine-tune, and the fine-tune re-scored with windows over long reviews
# (eval.window_stride: each of WINDOWS on validation, the best of them on test once).
# Each part is time-capped so the later ones still run; logs and results land in $OUT.
#   OUT=out WHEELS=.whl [SUITE_S=300 SUITE_BUDGET=240 SECTIONS=train,inference,blocked,attention]
#   [IMDB_DATA=<dir with sentiment_imdb/> LM_PRESET=imdb_self_wide512 LM_EXTRA= FT_EXTRA=
#    WINDOWS="0 127 254"] [END=570] bash bench/gpu_host.sh
# SUITE_S=0 skips the suite.
# WHEELS: built from requirements-gpu-carry.txt (how: its header); empty = nothing to install.
set -u -o pipefail
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
PY=${PY:-python3}; OUT=${OUT:?set OUT to a folder for the logs}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -n "${WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$WHEELS"/*.whl > "$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; exit 3; }
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2
# Fail in seconds, not after the suite, when a package is missing.
$PY -c "
import jax, sklearn, tensorboardX, tree
import bench.gpu_suite, train.main, train.run, infer.quantize, eval.classification
import eval.tfidf_baseline, train.data.sources, qwix, grain, tensorflow_datasets
print('imports ok; jax', jax.__version__, jax.devices())" 2>&1 | tail -5 || exit 4

if [ "${SUITE_S:-300}" != 0 ]; then
  echo "== GPU suite at $(el)s"
  timeout "${SUITE_S:-300}" $PY -m bench.gpu_suite --budget_s="${SUITE_BUDGET:-240}" \
      --sections="${SECTIONS:-train,inference,blocked,attention}" --out="$OUT/gpu_suite.md" \
      > "$OUT/gpu_suite.log" 2>&1; echo "suite rc=$? at $(el)s"
fi
[ -z "${IMDB_DATA:-}" ] && exit 0

# An IMDB LM (legal_pretrain.py:$LM_PRESET) and its curve fine-tune (docs/results/imdb.md,
# docs/results/pretraining.md); `xla` attention: the kernel the CPU runs use. Extra flags: LM_EXTRA,
# FT_EXTRA (e.g. LM_PRESET=imdb_self_wide LM_EXTRA=--config.train.num_steps=4500 LM_S=400).
export LEGAL_LM_DATA=$IMDB_DATA
R=/tmp/runs; mkdir -p $R; LM=${LM_PRESET:-imdb_self_wide512}
echo "== LM $LM at $(el)s"
# Input workers: on one process the pipeline (reading records + sentencepiece, ~25-45 ms per
# 16 x 512 batch on a 2-core CPU) is about the 39.5 ms/step an H200 runs the d_model 512 LM at
# (docs/results/gpu.md).
timeout -s TERM "${LM_S:-160}" $PY -m train.main \
    --config=configs/legal_pretrain.py:$LM --workdir=$R/$LM \
    --config.model.attention.implementation=xla --config.data.num_workers=${LM_WORKERS:-8} \
    ${LM_EXTRA:-} > "$OUT/$LM.log" 2>&1
echo "LM rc=$? at $(el)s"; grep "step .*/" "$OUT/$LM.log" | tail -2
STEP=$(ls $R/$LM/checkpoints | grep -E "^[0-9]+$" | sort -n | tail -1)
FT=curve_${LM}_$STEP
echo "== fine-tune from step $STEP at $(el)s"
timeout $(( ${END:-570} - $(el) )) $PY -m train.main \
    --config=configs/sentiment_finetune.py:imdb_self_curve --workdir=$R/$FT \
    --config.train.init_from=$R/$LM/checkpoints/$STEP \
    --config.model.attention.implementation=xla ${FT_EXTRA:-} > "$OUT/$FT.log" 2>&1
echo "fine-tune rc=$? at $(el)s"; grep "test evaluation\|validation:" "$OUT/$FT.log" | tail -3
# Long reviews read whole: each stride on validation, then the best (accuracy, then NLL) on test.
for S in ${WINDOWS:-0 127 254}; do
  timeout $(( ${END:-570} - $(el) )) $PY -m train.redecode --workdir=$R/$FT \
      --out=$R/${FT}_val_w$S --window_stride=$S --split=validation > "$OUT/${FT}_val_w$S.log" 2>&1
  echo "validation, window_stride=$S: rc=$? at $(el)s"
done
BEST=$($PY - "$R/${FT}_val_w" ${WINDOWS:-0 127 254} <<'PYEOF'
import json, sys
def score(stride):   # (validation accuracy, -NLL) of one re-scoring; None if it did not finish
  try:
    for line in open(f"{sys.argv[1]}{stride}/metrics.jsonl"):
      record = json.loads(line)
      if record["split"] == "test/model/classification":
        return record["accuracy"], -record["nll"]
  except OSError:
    return None
scores = {s: score(s) for s in sys.argv[2:]}
done = {s: v for s, v in scores.items() if v}
print(max(done, key=done.get) if done else "")
PYEOF
)
if [ -n "$BEST" ]; then
  echo "== test with window_stride=$BEST (chosen on validation) at $(el)s"
  timeout $(( ${END:-570} - $(el) )) $PY -m train.redecode --workdir=$R/$FT \
      --out=$R/${FT}_test_w$BEST --window_stride=$BEST > "$OUT/${FT}_test_w$BEST.log" 2>&1
  echo "test rc=$? at $(el)s"; grep "model: classification" "$OUT/${FT}_test_w$BEST.log"
fi
# Everything but checkpoints, in one file (a short-lived machine may return only a few files).
tar czf "$OUT/runs.tgz" --exclude=checkpoints --exclude=best -C $R .
