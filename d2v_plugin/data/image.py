"""fairseq adapter: image datasets read from the split lists of ``prep.image_folder``.

``{split}.tsv``: first line the image root, then ``relative/path<TAB>label`` (label
empty for unlabelled images). Images are decoded with Pillow and converted to RGB
(grayscale, palette, CMYK, alpha); an unreadable or truncated file raises
``ImageDataError`` naming the file, the list line and the fix. Augmentation is plain
torch: random resized crop (bicubic, antialiased) + horizontal flip for training,
resize + centre crop for evaluation, then per-channel normalisation.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..modules.image import IMAGENET_MEAN, IMAGENET_STD, prepare_image
from ..modules.masking import MaskSettings, seeded_generator
from .base import ListedFilesDataset, read_root_list


class ImageDataError(ValueError):
    """An image list or image file that cannot be used as it is."""


def read_image_list(path: str) -> Tuple[str, List[Tuple[str, str, int]]]:
    """-> root, [(relative path, label, line number)]."""
    root, lines = read_root_list(path, ImageDataError, "image list",
                                 "python -m d2v_plugin.prep.image_folder IMAGE_ROOT --dest DIR", "image")
    entries = []
    for n, line in lines:
        rel, _, label = line.partition("\t")
        entries.append((rel, label.strip(), n))
    return root, entries


def _high_depth_gray(img) -> Tensor:
    """A 16-bit / 32-bit integer or float grayscale image (Pillow modes I;16*, I, F) -> (3, H, W)
    in [0, 1] with its full range (``convert("RGB")`` would clip every value above 255)."""
    gray = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        lo, hi = float(gray.min()), float(gray.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"a float image with values in [{lo:g}, {hi:g}]; d2v_plugin reads float images as [0, 1]")
        scale = 1.0
    else:
        scale = 65535.0 if img.mode.startswith("I;16") or gray.max() <= 65535 else 4294967295.0
    return torch.from_numpy(gray / scale).float().clamp_(0.0, 1.0)[None].expand(3, -1, -1).contiguous()


def load_image(path: str, where: str) -> Tensor:
    """-> (3, H, W) float in [0, 1]; 16-bit and float grayscale keep their full range."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()  # decode now: truncated files fail here, not later
            if img.mode.startswith("I") or img.mode == "F":
                return _high_depth_gray(img)
            if img.mode == "RGBA" or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            rgb = img.convert("RGB")
    except Exception as e:  # Pillow raises several types for unreadable/truncated files
        raise ImageDataError(f"{path} ({where}): cannot decode image: {e}. Re-save it (e.g. as PNG) or remove the line.") from e
    arr = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy())  # (H, W, 3)
    return arr.permute(2, 0, 1).float() / 255.0


def resize(img: Tensor, size: Tuple[int, int]) -> Tensor:
    """(C, H, W) -> (C, *size), bicubic with antialiasing, clamped to [0, 1]."""
    out = F.interpolate(img[None], size=size, mode="bicubic", align_corners=False, antialias=True)[0]
    return out.clamp_(0.0, 1.0)


def random_resized_crop(img: Tensor, size: int, scale: Tuple[float, float], generator: torch.Generator,
                        ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """A crop of random area (fraction ``scale`` of the image) and aspect ratio, resized
    to size x size; after 10 failed draws, the largest centred crop of allowed ratio."""
    _, H, W = img.shape
    u = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=generator))  # noqa: E731
    for _ in range(10):
        area = H * W * u(*scale)
        aspect = math.exp(u(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < w <= W and 0 < h <= H:
            top = int(torch.randint(0, H - h + 1, (), generator=generator))
            left = int(torch.randint(0, W - w + 1, (), generator=generator))
            return resize(img[:, top : top + h, left : left + w], (size, size))
    aspect = W / H
    if aspect < ratio[0]:
        w, h = W, int(round(W / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(H * ratio[1])), H
    else:
        w, h = W, H
    top, left = (H - h) // 2, (W - w) // 2
    return resize(img[:, top : top + h, left : left + w], (size, size))


def center_crop(img: Tensor, size: int, crop_fraction: float = 0.875) -> Tensor:
    """Resize the shorter side to size / crop_fraction, then the central size x size."""
    _, H, W = img.shape
    short = int(round(size / crop_fraction))
    h, w = (short, max(short, round(W * short / H))) if H <= W else (max(short, round(H * short / W)), short)
    img = resize(img, (h, w))
    top, left = (h - size) // 2, (w - size) // 2
    return img[:, top : top + size, left : left + size]


class ImageDataset(ListedFilesDataset):
    def __init__(self, list_path: str, size: int, train: bool, seed: int = 1, labels: Optional[Sequence[str]] = None,
                 min_crop_scale: float = 0.2, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        """labels: the label dictionary (names, index = class id) for classification, or None."""
        super().__init__()
        self.list_path, self.size, self.train, self.seed, self.min_crop_scale = list_path, size, train, seed, min_crop_scale
        self.root, entries = read_image_list(list_path)
        if not entries:
            raise ImageDataError(f"{list_path}: lists no image")
        self.check_exist(list_path, self.root, entries, ImageDataError, "image_folder")
        self.files = [e[0] for e in entries]
        self.lines = [e[2] for e in entries]
        self.targets = None
        if labels is not None:
            index = {name: i for i, name in enumerate(labels)}
            bad = [(lab, n) for _, lab, n in entries if lab not in index]
            if bad:
                shown = ", ".join(f"line {n}: {lab!r}" for lab, n in bad[:5])
                raise ImageDataError(f"{list_path}: {len(bad)} image(s) with a label outside labels.txt ({shown}); "
                                     "classification needs class sub-folders; rebuild the lists")
            self.targets = np.array([index[lab] for _, lab, _ in entries], dtype=np.int64)
        self.mean, self.std = mean, std
        self.sizes = np.ones(len(self.files), dtype=np.int64)
        self.epoch = 1
        self.masking: Optional[MaskSettings] = None

    def set_masking(self, masking: MaskSettings) -> None:
        """Let the collater (data workers) draw the model's masks."""
        self.masking = masking

    def __getitem__(self, index: int) -> Dict:
        path = os.path.join(self.root, self.files[index])
        img = load_image(path, f"{self.list_path}, line {self.lines[index]}")
        if self.train:
            g = seeded_generator(self.seed, self.epoch, index)
            img = random_resized_crop(img, self.size, (self.min_crop_scale, 1.0), g)
            if float(torch.rand((), generator=g)) < 0.5:
                img = img.flip(-1)
        else:
            img = center_crop(img, self.size)
        item = {"id": index, "source": prepare_image(img, self.mean, self.std)}
        if self.targets is not None:
            item["target"] = int(self.targets[index])
        return item

    def size(self, index: int) -> int:
        return 1

    def num_tokens(self, index: int) -> int:
        return 1

    def ordered_indices(self):
        if not self.train:
            return np.arange(len(self))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self))

    def collater(self, samples: List[Dict]) -> Dict:
        if not samples:
            return {}
        ids = torch.tensor([s["id"] for s in samples])
        source = torch.stack([s["source"] for s in samples])
        net_input = {"source": source}
        if self.masking is not None:
            L = self.masking.grid[0] * self.masking.grid[1]
            g = seeded_generator(self.seed, self.epoch, *ids.tolist())
            net_input["mask"] = self.masking(torch.full((len(samples),), L), L, g)
        batch = {"id": ids, "net_input": net_input, "nsentences": len(samples)}
        if self.targets is not None:
            batch["target"] = torch.tensor([s["target"] for s in samples])
        return batch
