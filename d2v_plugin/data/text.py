"""fairseq adapter: token blocks from ``fairseq-preprocess`` output for text pretraining.

Each sample is a block of at most ``tokens_per_sample - 1`` tokens (fairseq's
TokenBlockDataset, ``sample_break_mode``) with ``<s>`` prepended; batches are padded on
the right and carry ``padding_mask`` (True = padding) and, once the model is built, the
model's masks drawn in the data workers.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch
from fairseq.data import FairseqDataset, PrependTokenDataset, TokenBlockDataset, data_utils

from ..modules.masking import MaskSettings, seeded_generator
from .base import CompleteBatches


class TextDataError(ValueError):
    """Text data that cannot be used as it is."""


class TextBlockDataset(CompleteBatches, FairseqDataset):
    def __init__(self, prefix: str, dictionary, tokens_per_sample: int, break_mode: str = "none", seed: int = 1,
                 shuffle: bool = True):
        super().__init__()
        tokens = data_utils.load_indexed_dataset(prefix, dictionary, combine=False)
        if tokens is None:
            raise TextDataError(f"{prefix}.bin/.idx not found; binarise the text with `python -m d2v_plugin.prep.text RAW --dest DIR`")
        blocks = TokenBlockDataset(tokens, tokens.sizes, tokens_per_sample - 1, pad=dictionary.pad(), eos=dictionary.eos(),
                                   break_mode=break_mode)
        self.blocks = PrependTokenDataset(blocks, dictionary.bos())
        self.sizes = np.asarray(self.blocks.sizes)
        self.pad, self.seed, self.shuffle, self.epoch = dictionary.pad(), seed, shuffle, 1
        self.masking: Optional[MaskSettings] = None

    def set_masking(self, masking: MaskSettings) -> None:
        self.masking = masking

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> Dict:
        return {"id": index, "source": self.blocks[index]}

    def size(self, index: int) -> int:
        return int(self.sizes[index])

    def num_tokens(self, index: int) -> int:
        return int(self.sizes[index])

    def num_tokens_vec(self, indices):
        return self.sizes[indices]

    def ordered_indices(self):
        if not self.shuffle:
            return np.argsort(self.sizes, kind="stable")
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self))
        return order[np.argsort(self.sizes[order], kind="stable")]

    def collater(self, samples: List[Dict]) -> Dict:
        if not samples:
            return {}
        ids = torch.tensor([s["id"] for s in samples])
        source = data_utils.collate_tokens([s["source"] for s in samples], self.pad)  # (B, T) right-padded
        padding = source.eq(self.pad)
        net_input = {"source": source, "padding_mask": padding}
        if self.masking is not None:
            g = seeded_generator(self.seed, self.epoch, *ids.tolist())
            net_input["mask"] = self.masking((~padding).sum(1), source.shape[1], g)
        return {"id": ids, "net_input": net_input, "ntokens": int((~padding).sum()), "nsentences": len(samples)}
