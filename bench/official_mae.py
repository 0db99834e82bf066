"""Run the official MAE (``examples/data2vec/models/mae.py``, task ``mae_image_pretraining``) with
the fairseq of the reference environment, on the timm that environment has.

    PYTHONPATH=REF/root REF/venv/bin/python bench/official_mae.py --config-dir REF/root/examples/data2vec/config/vision/pretraining \
        --config-name base_mae_imagenet common.user_dir=REF/root/examples/data2vec task.data=ROOT ...

Arguments are ``fairseq-hydra-train``'s. The official model builds timm's ``Block`` with
``qk_scale=None``, an argument timm removed in 0.6 (None meant the default 1/sqrt(head dim), which
timm 1.0 always uses); every other argument it passes still exists. ``timm_compat`` drops that one
argument and refuses any other value, so the official code runs unedited and computes what it
computed on the timm it was written for.
"""
from __future__ import annotations

import functools
import sys


def timm_compat() -> None:
    from timm.models import vision_transformer as vit

    init = vit.Block.__init__
    if getattr(init, "_drops_qk_scale", False):
        return

    @functools.wraps(init)
    def block_init(self, *args, qk_scale=None, **kwargs):
        if qk_scale is not None:
            raise TypeError(f"qk_scale={qk_scale}: timm >= 0.6 always scales by 1/sqrt(head dim)")
        init(self, *args, **kwargs)

    block_init._drops_qk_scale = True
    vit.Block.__init__ = block_init


if __name__ == "__main__":
    timm_compat()
    from fairseq_cli.hydra_train import cli_main

    sys.argv[0] = "fairseq-hydra-train"
    cli_main()
