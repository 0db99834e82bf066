#!/usr/bin/env bash
# Prepares what bench/gpu_check.sh needs on a lent GPU machine that has no internet
# (Python 3.12 with torch, transformers, timm and cython; no fairseq). Run here, in the
# repository root, after `make venv sysdeps` (and, for the official-code rows,
# `bash ../shared/reference/setup_reference.sh REF`):
#     bash bench/gpu_prepare.sh [REF]
# It fills .gpu/ (git-ignored through .git/info/exclude; about 30 MiB; the device tool carries 64 MiB in all, the checkout ~28):
#     .gpu/whl/   cp312 manylinux wheels of what that machine lacks: ve-fairseq 0.12.3 (it has a
#                 cp312 wheel on PyPI), hydra-core, omegaconf, antlr4 (built here: PyPI has only
#                 its sdist), bitarray, soundfile, cffi, pycparser, editdistance
#     .gpu/data/  small sample corpora: speech (espeak-ng, 48 utterances + manifest), images
#                 (Fashion-MNIST, 500 at 32 px), text (100 news articles, 8k sentencepiece)
#     .gpu/ref/   with REF: the official data2vec code (REF/root/examples, runs on the same fairseq),
#                 official_bench.sh + parse_fairseq_log.py, and the Bible text data official_bench.sh
#                 tokenises (bible-kjv is not there; its audio and image data it makes itself)
# Then: the device tool's run with carry [".gpu"] and command "bash bench/gpu_check.sh".
set -euo pipefail
REF=${1:-}
PY=.venv/bin/python
G=.gpu
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
mkdir -p $G/whl $G/data
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any)
for p in ve-fairseq==0.12.3 hydra-core==1.3.2 omegaconf==2.3.0 bitarray==3.12.3 soundfile==0.14.0 cffi==2.1.1 \
         pycparser==3.12 editdistance==0.8.1; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d $G/whl "$p"
done
ls $G/whl | grep -q antlr4 || $PY -m pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w $G/whl
D=$G/data
if [[ ! -f $D/speech/manifest/train.tsv ]]; then
  $PY -m d2v_plugin.samples speech --out $D/speech --n 48
  $PY -m d2v_plugin.prep.audio_manifest $D/speech/wav --dest $D/speech/manifest --valid-percent 0.1
fi
if [[ ! -f $D/images/lists/train.tsv ]]; then
  $PY -m d2v_plugin.samples images --out $D/images --n 500 --size 32
  $PY -m d2v_plugin.prep.image_folder $D/images --dest $D/images/lists --labelled 100
fi
pwd > $D/ROOT  # manifests name absolute folders: gpu_check.sh rewrites this prefix to its own root
if [[ ! -f $D/text/data/train.bin ]]; then
  $PY -m d2v_plugin.samples text --out $D/text --n 100
  $PY -m d2v_plugin.prep.text $D/text/news.txt --dest $D/text/data --vocab-size 8000 --valid-percent 0.05
  rm -rf $D/text/sentiment $D/text/data/*.bpe  # only the binarised pretraining data travels
fi
if [[ -n $REF ]]; then
  rm -rf $G/ref && mkdir -p $G/ref/root $G/ref/scripts && cp -r "$REF/root/examples" $G/ref/root/
  cp ../shared/reference/official_bench.sh ../shared/reference/parse_fairseq_log.py $G/ref/scripts/
  # one tiny CPU round of the side by side: checks the flow here and makes the text data
  W=/tmp/d2v_gpu_vsr
  $PY bench/vs_reference.py --ref "$REF" --work $W --modalities text --rounds 1 --updates 3 --log-interval 1 \
    --out $W/cpu.json
  mkdir -p $G/ref/vsr/text && cp $W/text/dict.txt $W/text/{train,valid}.{bin,idx} $G/ref/vsr/text/
fi
du -sh $G
size=$(( $(du -sb $G | cut -f1) + $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) ))
(( size < 64 * 1024 * 1024 )) || { echo "gpu_prepare.sh: .gpu + the checkout = $((size >> 20)) MiB, over the device tool's 64 MiB"; exit 1; }
echo "ready: device run with carry [\".gpu\"], command \"bash bench/gpu_check.sh\""
