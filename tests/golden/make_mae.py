"""Record a tiny official MAE encoder (``examples/data2vec/models/mae.py``) and its features.

Run in the reference environment (``../shared/reference/setup_reference.sh DIR``), not by CI:

    DIR/venv/bin/python tests/golden/make_mae.py --reference DIR --out tests/golden/mae_image.pt

Builds ``MaeModel`` at a tiny size (16x16 inputs, 4x4 patches, 2 pre-LN blocks of 32, 4 heads),
adds seeded noise ``0.02 * N(0, 1)`` to every parameter (the fixed sin-cos table and the CLS
position included, so a converter must carry them, not recompute them), and records the encoder
output without masking (``model(images, predictions_only=True)``: CLS first, after the final
norm) and each block's output. ``tests/test_convert.py`` converts it with ``d2v_plugin.official``
and compares. The official model needs timm's removed ``qk_scale`` argument:
``bench/official_mae.py`` supplies it (see there).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = dict(input_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=4, decoder_embed_dim=16,
             decoder_depth=1, decoder_num_heads=2, mlp_ratio=4, norm_eps=1e-6, mask_ratio=0.75)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, help="the folder setup_reference.sh made")
    ap.add_argument("--out", default=os.path.join(HERE, "mae_image.pt"))
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    root = os.path.join(a.reference, "root")
    sys.path[:0] = [root, os.path.join(root, "examples", "data2vec"), os.path.join(HERE, "..", "..", "bench")]
    np.float = float  # the official tree's removed numpy alias
    from official_mae import timm_compat

    timm_compat()
    from examples.data2vec.models.mae import MaeConfig, MaeModel
    from omegaconf import OmegaConf

    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    cfg = OmegaConf.structured(MaeConfig(**MODEL))
    model = MaeModel(cfg).eval()
    noise = torch.Generator().manual_seed(a.seed + 1000)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=noise))
    images = torch.randn(2, 3, 16, 16, generator=noise)
    blocks = []
    hooks = [b.register_forward_hook(lambda m, i, o: blocks.append(o.detach().clone())) for b in model.blocks]
    with torch.no_grad():
        latent = model(images, predictions_only=True)
    for h in hooks:
        h.remove()
    torch.save({"format_version": 1, "kind": "model", "name": "mae_image", "family": "mae",
                "config": {"_name": "mae", **OmegaConf.to_container(cfg)}, "state_dict": model.state_dict(),
                "inputs": {"images": images}, "outputs": {"latent": latent, "block_outputs": blocks}}, a.out)
    print(f"wrote {a.out}: latent {tuple(latent.shape)}, {len(blocks)} blocks")


if __name__ == "__main__":
    main()
