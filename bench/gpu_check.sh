#!/usr/bin/env bash
# The GPU check of mixed precision (run on a lent GPU machine, under 8 minutes; prepare with
# bench/gpu_prepare.sh here, then the device tool's run with carry [".gpu"] and command
# "bash bench/gpu_check.sh"). Needs no internet: fairseq and the plugin's other needs come
# as wheels from .gpu/whl, sample data from .gpu/data.
#   1. real fairseq-hydra-train pretraining, tiny_v2, every modality, common.fp16=true and
#      common.bf16=true, 40 updates: no NaN/inf loss, the loss falls, the saved teacher
#      (_ema) is fp32 and finite (bench/gpu_check.py);
#   2. bench/pretrain.py --device cuda at base size (v2, clone_batch 8): fp32, bf16, fp16 and
#      bf16 autocast, with achieved TFLOP/s, the GPU's own matrix-product rate and MFU;
#   3. with .gpu/ref (gpu_prepare.sh REF): bench/vs_reference.py --device cuda, the official code
#      and the plugin at the same settings, images and text, fp32 / bf16, one round.
# Writes everything under $OUT (the device tool brings it back): gpu_check.log, train_*.log,
# pretrain_cuda.json, vs_reference_cuda.json. Exit status: non-zero when any check failed.
# GPU_CHECK_SIMULATE=cpu runs the same flow here on the CPU (this checkout's .venv, bf16 only,
# tiny sizes, few updates), to check the script before spending device time on it;
# GPU_CHECK_REF_PYTHON=REF/venv/bin/python then runs the official code in its own venv.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
G=.gpu
[[ -d $G/whl && -d $G/data ]] || { echo "gpu_check.sh: no $G/whl or $G/data: run bash bench/gpu_prepare.sh here first and carry .gpu"; exit 2; }
if [[ ${GPU_CHECK_SIMULATE:-} == cpu ]]; then
  PY=$PWD/.venv/bin/python DEV=cpu PRECS=(bf16) CPU=true UPDATES=20 SIZES=(--sizes tiny) PT_PRECS=fp32,bf16
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $G/whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site:$PWD
  PY=python3 DEV=cuda PRECS=(fp16 bf16) CPU=false UPDATES=40 SIZES=(--sizes base) PT_PRECS=fp32,bf16,fp16,autocast
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
export PYTHONUNBUFFERED=1
$PY -c "import torch, fairseq, d2v_plugin; print('torch', torch.__version__, 'fairseq', fairseq.__version__, 'cuda', torch.cuda.is_available())" || exit 2
# the manifests name absolute folders of the machine that made them
old=$(cat $G/data/ROOT)
for f in $G/data/speech/manifest/*.tsv $G/data/images/lists/*.tsv; do sed -i "1s#^$old#$PWD#" "$f"; done
USER_DIR=$PWD/d2v_plugin
fails=0
declare -A DATA=([audio]=$G/data/speech/manifest [image]=$G/data/images/lists [text]=$G/data/text/data)
for mod in audio image text; do
  for prec in "${PRECS[@]}"; do
    save=/tmp/gpu_ckpt_${mod}_$prec log=$OUT/train_${mod}_$prec.log
    rm -rf "$save"
    timeout 150 $PY -m fairseq_cli.hydra_train --config-dir config/pretrain/$mod --config-name tiny_v2 \
      task.data=${DATA[$mod]} common.user_dir=$USER_DIR checkpoint.save_dir=$save hydra.run.dir=/tmp/gpu_hydra_$mod \
      common.$prec=true common.cpu=$CPU common.log_interval=$((UPDATES / 6)) optimization.max_update=$UPDATES \
      checkpoint.save_interval_updates=$UPDATES lr_scheduler.warmup_updates=$((UPDATES / 4)) \
      dataset.validate_interval_updates=0 dataset.disable_validation=true \
      dataset.num_workers=2 > "$log" 2>&1
    rc=$?
    $PY bench/gpu_check.py "$log" "$save/checkpoint_last.pt" "$mod $prec" --rc $rc || fails=$((fails + 1))
  done
done
timeout 180 $PY bench/pretrain.py --device $DEV "${SIZES[@]}" --algorithms v2 --clones 8 --base-clones 8 --reps 5 \
  --precision $PT_PRECS --out "$OUT/pretrain_$DEV.json" || fails=$((fails + 1))
if [[ -d $G/ref/root ]]; then  # the side by side with the official code: a reference "venv" of this python
  R=/tmp/d2v_ref W=/tmp/d2v_gpu_vsr_$DEV
  mkdir -p $R/venv/bin $W/text && ln -sfn $PWD/$G/ref/root $R/root && cp $G/ref/vsr/text/* $W/text/
  RPY=${GPU_CHECK_REF_PYTHON:-$PY}  # simulating: a python with torchvision (the official image task imports it)
  printf '#!/bin/sh\nexec %s "$@"\n' "$RPY" > $R/venv/bin/python
  printf '#!/bin/sh\nexec %s -m fairseq_cli.hydra_train "$@"\n' "$RPY" > $R/venv/bin/fairseq-hydra-train
  chmod +x $R/venv/bin/python $R/venv/bin/fairseq-hydra-train
  timeout 150 $PY bench/vs_reference.py --ref $R --work $W --ref-scripts $G/ref/scripts --python $R/venv/bin/python \
    --device $DEV --modalities image,text --rounds 1 --updates 20 --log-interval 2 --precision fp32,bf16 \
    --out "$OUT/vs_reference_$DEV.json" || fails=$((fails + 1))
else
  echo "gpu_check.sh: no $G/ref (bench/gpu_prepare.sh REF makes it): no side by side with the official code"
fi
echo "gpu_check.sh: $fails check(s) failed"
exit $((fails > 0))
