#!/usr/bin/env bash
# The GPU check of mixed precision (run on a lent GPU machine, under 8 minutes; prepare with
# bench/gpu_prepare.sh here, then the device tool's run with carry [".gpu"] and command
# "bash bench/gpu_check.sh"). Needs no internet: fairseq and the plugin's other needs come
# as wheels from .gpu/whl, sample data from .gpu/data.
#   1. real fairseq-hydra-train pretraining, tiny_v2, every modality, common.fp16=true and
#      common.bf16=true, 60 updates: no NaN/inf loss, the loss falls, the saved teacher
#      (_ema) is fp32 and finite (bench/gpu_check.py);
#   2. bench/pretrain.py --device cuda at base size (v2, clone_batch 8): fp32, bf16, fp16 and
#      bf16 autocast, with achieved TFLOP/s, the GPU's own matrix-product rate and MFU;
#   3. with .gpu/ref (gpu_prepare.sh REF): bench/vs_reference.py --device cuda, the official code
#      and the plugin at the same settings, fp32 / bf16 / fp16, one round.
# Writes everything under $OUT (the device tool brings it back): gpu_check.log, train_*.log,
# pretrain_cuda.json, vs_reference_cuda.json. Exit status: non-zero when any check failed.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
G=.gpu
[[ -d $G/whl && -d $G/data ]] || { echo "gpu_check.sh: no $G/whl or $G/data: run bash bench/gpu_prepare.sh here first and carry .gpu"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $G/whl/*.whl || exit 2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, fairseq, d2v_plugin; print('torch', torch.__version__, 'fairseq', fairseq.__version__, 'cuda', torch.cuda.is_available())" || exit 2
# the manifests name absolute folders of the machine that made them
old=$(cat $G/data/ROOT)
for f in $G/data/speech/manifest/*.tsv $G/data/images/lists/*.tsv; do sed -i "1s#^$old#$PWD#" "$f"; done
USER_DIR=$PWD/d2v_plugin
fails=0
declare -A DATA=([audio]=$G/data/speech/manifest [image]=$G/data/images/lists [text]=$G/data/text/data)
for mod in audio image text; do
  for prec in fp16 bf16; do
    save=/tmp/gpu_ckpt_${mod}_$prec log=$OUT/train_${mod}_$prec.log
    rm -rf "$save"
    timeout 150 python3 -m fairseq_cli.hydra_train --config-dir config/pretrain/$mod --config-name tiny_v2 \
      task.data=${DATA[$mod]} common.user_dir=$USER_DIR checkpoint.save_dir=$save hydra.run.dir=/tmp/gpu_hydra_$mod \
      common.$prec=true common.cpu=false common.log_interval=10 optimization.max_update=60 \
      checkpoint.save_interval_updates=60 dataset.validate_interval_updates=0 dataset.disable_validation=true \
      dataset.num_workers=2 > "$log" 2>&1
    rc=$?
    python3 bench/gpu_check.py "$log" "$save/checkpoint_last.pt" "$mod $prec" --rc $rc || fails=$((fails + 1))
  done
done
timeout 150 python3 bench/pretrain.py --device cuda --sizes base --algorithms v2 --base-clones 8 \
  --precision fp32,bf16,fp16,autocast --reps 5 --out "$OUT/pretrain_cuda.json" || fails=$((fails + 1))
if [[ -d $G/ref/root ]]; then  # the side by side with the official code: a reference "venv" of this python
  R=/tmp/d2v_ref W=/tmp/d2v_gpu_vsr
  mkdir -p $R/venv/bin $W && ln -sfn $PWD/$G/ref/root $R/root && cp -a $G/ref/vsr/text $W/
  printf '#!/bin/sh\nexec python3 "$@"\n' > $R/venv/bin/python
  chmod +x $R/venv/bin/python
  printf '#!/bin/sh\nexec python3 -m fairseq_cli.hydra_train "$@"\n' > $R/venv/bin/fairseq-hydra-train
  chmod +x $R/venv/bin/fairseq-hydra-train
  timeout 200 python3 bench/vs_reference.py --ref $R --work $W --ref-scripts $G/ref/scripts --python $R/venv/bin/python \
    --device cuda --rounds 1 --updates 30 --precision fp32,bf16,fp16 --out "$OUT/vs_reference_cuda.json" \
    || fails=$((fails + 1))
else
  echo "gpu_check.sh: no $G/ref (bench/gpu_prepare.sh REF makes it): no side by side with the official code"
fi
echo "gpu_check.sh: $fails check(s) failed"
exit $((fails > 0))
