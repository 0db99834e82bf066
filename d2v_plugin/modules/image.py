"""The image modality encoder (data2vec 1.0 §3.1 / data2vec 2.0 §3.2, "Computer vision").

image (B, C, H, W) --patch embedding: Conv2d(patch, stride patch)--> (B, L, D) patches,
row-major over the (H/p, W/p) grid = "local features" (+ fixed 2-D sin-cos positions).
Per view: learned extra tokens (CLS) are prepended, then the context stage (LayerNorm,
prenet blocks). data2vec 2.0 keeps only visible patches in the student (inverse block
masks) and predicts the rest with a 2-D conv decoder; its teacher owns an EMA copy of
the patch embedding. data2vec 1.0 replaces masked patches (BEiT rectangles) by a
learned ``mask_emb``. The position table is resized when the input size changes.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .decoder import ConvDecoder
from .ema import teacher_view
from .encoder import ModalityEncoder
from .masking import MaskSettings
from .positional import resize_grid, sincos_2d
from .settings import Data2VecSettings
from .transformer import ContextEncoder


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int, patch: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_chans, dim, patch, stride=patch)
        w = self.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear over the flattened patch

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, L, D), L = (H / p) * (W / p) row-major."""
        H, W = images.shape[-2:]
        if H % self.patch or W % self.patch:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {self.patch}")
        return self.proj(images).flatten(2).transpose(1, 2)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def prepare_image(image: Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Tensor:
    """A decoded RGB image (3, H, W) in [0, 1] -> the model's input, normalised per channel."""
    return (image - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


class ImageEncoder(ModalityEncoder):
    modality = "image"

    def __init__(self, s: Data2VecSettings, make_block):
        super().__init__()
        img = s.image
        D = s.embed_dim
        if img.input_size % img.patch_size:
            raise ValueError(f"image_input_size={img.input_size} is not a multiple of image_patch_size={img.patch_size}")
        side = img.input_size // img.patch_size
        self.grid, self.input_size = (side, side), img.input_size
        self.patch_embed = PatchEmbed(img.in_chans, D, img.patch_size)
        # a frozen parameter (not a buffer) so checkpoints carry it and the teacher copies it
        self.positions = nn.Parameter(sincos_2d(D, side, side)[None], requires_grad=False)  # (1, L, D)
        E = img.num_extra_tokens
        self.extra_tokens = nn.Parameter(torch.randn(1, E, D)) if E > 0 else None
        prenet = nn.ModuleList(make_block(k, img.prenet_depth) for k in range(img.prenet_depth))
        self.context = ContextEncoder(D, s.norm_eps, img.prenet_dropout, prenet, s.layer_norm_first)
        self.masking = MaskSettings(img.mask_type, img.mask_prob, img.mask_length, img.mask_prob_adjust, s.clone_batch, self.grid)
        self.mask_emb = nn.Parameter(torch.zeros(D).normal_(0, 0.02)) if s.algorithm == "v1" else None
        self.decoder = ConvDecoder.from_settings(D, img.decoder, self.grid) if s.algorithm == "v2" else None
        self.teacher_owns_patch_embed = img.ema_local_encoder and s.algorithm == "v2"  # v1 teachers share it
        self.cls_loss_weight = img.cls_loss if s.algorithm == "v2" else 0.0

    # -- shared by student and teacher -------------------------------------------------
    def local_features(self, source: Tensor, padding_mask: Optional[Tensor] = None) -> Tuple[Tensor, None]:
        """source: (B, C, H, W) -> patches (B, L, D), no padding."""
        return self.patch_embed(source), None

    def add_positions(self, x: Tensor, padding_mask: Optional[Tensor] = None, zero_mask: Optional[Tensor] = None) -> Tensor:
        """x: (B, L, D) -> x + fixed 2-D positions (resized if the grid differs)."""
        L = x.shape[1]
        table = self.positions
        if L != table.shape[1]:
            side = int(round(L**0.5))
            if side * side != L:
                raise ValueError(f"{L} patches are not a square grid")
            table = resize_grid(table, self.grid, (side, side))
        return x + table.to(x.dtype)

    def teacher_features(self, teacher: "ImageEncoder", feats: Tensor, padding_mask: Optional[Tensor],
                         source: Tensor) -> Tuple[Tensor, None]:
        """data2vec 2.0: the teacher embeds the images with its own EMA patch embedding (fp32)."""
        if self.teacher_owns_patch_embed:
            return teacher.local_features(source.float())
        return feats, padding_mask

    def teacher_copy(self) -> "ImageEncoder":
        """What the EMA teacher owns: positions, extra tokens, context and (data2vec 2.0)
        its own patch embedding; never the decoder or the mask embedding."""
        dropped = ("decoder",) if self.teacher_owns_patch_embed else ("decoder", "patch_embed")
        return teacher_view(self, dropped, ("mask_emb",))
