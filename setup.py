"""d2v_plugin: data2vec 1.0 + 2.0 as a fairseq plugin (see README.md)."""
from setuptools import find_packages, setup

setup(
    name="d2v_plugin",
    version="0.1.0",
    description="data2vec 1.0 and 2.0 (speech, images, text) as a fairseq --user-dir plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["d2v_plugin", "d2v_plugin.*"]),
    install_requires=[
        # fairseq main as a cp311 wheel; PyPI fairseq 0.12.2 does not import on Python >= 3.11
        "ve-fairseq==0.12.3",
        # any torch >= 2.1 works; the Makefile installs the CPU build 2.13.0 first
        "torch>=2.1",
        "numpy>=1.24",
        "scipy>=1.10",
        "soundfile>=0.12",
        "sentencepiece>=0.1.99",
        # edit distance for UER/WER: fairseq's own `--scoring wer` imports it
        "editdistance>=0.8",
        # image decoding (JPEG/PNG/..., grayscale/CMYK/alpha -> RGB); augmentation is written with torch ops
        "Pillow>=9",
    ],
    extras_require={
        "test": ["pytest>=7", "ruff>=0.5", "flashlight-text>=0.0.7", "safetensors>=0.4", "transformers>=4.40"],
        # python -m d2v_plugin.export --to safetensors|hf, d2v_plugin.load(DIR) of an export
        "hf": ["safetensors>=0.4", "transformers>=4.40"],
        # fairseq-generate --decoder beam|kenlm: flashlight-text's CTC beam search with KenLM built in
        "lm": ["flashlight-text>=0.0.7"],
        # training_curves.png at the end of every run and `python -m d2v_plugin.plot`
        "plot": ["matplotlib>=3.7"],
        # common.tensorboard_logdir: fairseq writes its meters with torch.utils.tensorboard
        "tensorboard": ["tensorboard>=2.14"],
    },
)
