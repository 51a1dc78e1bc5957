#!/bin/bash
# One prepared run for a bare GPU host (a lent machine, a fresh cloud VM): install the carried
# wheels, check every import, run the GPU suite, then optionally the IMDB width experiment.
# Each part is time-capped so the later ones still run; logs and results land in $OUT.
#   OUT=out WHEELS=.whl [SUITE_S=230 SUITE_BUDGET=170] [IMDB_DATA=<dir with sentiment_imdb/>]
#   [END=570] bash bench/gpu_host.sh
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

echo "== GPU suite at $(el)s"
timeout "${SUITE_S:-230}" $PY -m bench.gpu_suite --budget_s="${SUITE_BUDGET:-170}" \
    --sections=attention,train,inference,blocked --out="$OUT/gpu_suite.md" \
    > "$OUT/gpu_suite.log" 2>&1; echo "suite rc=$? at $(el)s"
[ -z "${IMDB_DATA:-}" ] && exit 0

# The d_model 512 IMDB LM and its curve fine-tune (README "IMDB self-pre-training"); `xla`
# attention: the kernel the CPU runs use. Extra flags: LM_EXTRA, FT_EXTRA.
export LEGAL_LM_DATA=$IMDB_DATA
R=/tmp/runs; mkdir -p $R
echo "== LM at $(el)s"
timeout -s TERM "${LM_S:-160}" $PY -m train.main \
    --config=configs/legal_pretrain.py:imdb_self_wide512 --workdir=$R/imdb_512 \
    --config.model.attention.implementation=xla ${LM_EXTRA:-} > "$OUT/imdb_512.log" 2>&1
echo "LM rc=$? at $(el)s"; grep "step .*/" "$OUT/imdb_512.log" | tail -2
STEP=$(ls $R/imdb_512/checkpoints | grep -E "^[0-9]+$" | sort -n | tail -1)
echo "== fine-tune from step $STEP at $(el)s"
timeout $(( ${END:-570} - $(el) )) $PY -m train.main \
    --config=configs/sentiment_finetune.py:imdb_self_curve --workdir=$R/curve512_$STEP \
    --config.train.init_from=$R/imdb_512/checkpoints/$STEP \
    --config.model.attention.implementation=xla ${FT_EXTRA:-} > "$OUT/curve512.log" 2>&1
echo "fine-tune rc=$? at $(el)s"; grep "test evaluation\|validation:" "$OUT/curve512.log" | tail -3
# Everything but checkpoints, in one file (a lent machine returns few files).
tar czf "$OUT/runs.tgz" --exclude=checkpoints --exclude=best -C $R .
