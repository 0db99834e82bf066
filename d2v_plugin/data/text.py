"""fairseq adapter: token blocks from ``fairseq-preprocess`` output for text pretraining.

Each sample is a block of at most ``tokens_per_sample - 1`` tokens (fairseq's
TokenBlockDataset, ``sample_break_mode``) with ``<s>`` prepended; batches are padded on
the right and carry ``padding_mask`` (True = padding) and, once the model is built, the
model's masks drawn in the data workers.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional

import numpy as np
import torch
from fairseq.data import FairseqDataset, PrependTokenDataset, TokenBlockDataset, data_utils

from ..modules.masking import MaskSettings, seeded_generator
from ..modules.text import prepare_tokens
from .base import CompleteBatches

logger = logging.getLogger(__name__)


class TextDataError(ValueError):
    """Text data that cannot be used as it is."""


class SizedSamples(CompleteBatches, FairseqDataset):
    """Samples of ``self.sizes`` tokens: shuffled per epoch (or sorted), batched by tokens."""

    sizes: np.ndarray
    seed, epoch, shuffle = 1, 1, True

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sizes)

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


class TextBlockDataset(SizedSamples):
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

    def __getitem__(self, index: int) -> Dict:
        return {"id": index, "source": self.blocks[index]}

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


class SentenceDataset(SizedSamples):
    """Sentences (or pairs) from ``prep.text_classification`` with their labels:
    ``<s> s1 </s>`` or ``<s> s1 </s> </s> s2 </s>`` (RoBERTa), cut to ``max_positions``
    (the number of cut samples is logged)."""

    def __init__(self, data: str, split: str, dictionary, max_positions: int, regression: bool, shuffle: bool = True,
                 seed: int = 1):
        super().__init__()
        self.inputs = []
        for k in range(2):
            folder = os.path.join(data, f"input{k}")
            if k == 1 and not os.path.isdir(folder):
                break
            ds = data_utils.load_indexed_dataset(os.path.join(folder, split), dictionary, combine=False)
            if ds is None:
                raise TextDataError(f"{folder}/{split}.bin not found; run d2v_plugin.prep.text_classification")
            self.inputs.append(ds)
        label_path = os.path.join(data, f"{split}.label")
        with open(label_path, encoding="utf-8") as f:
            labels = [line.strip() for line in f if line.strip()]
        if len(labels) != len(self.inputs[0]):
            raise TextDataError(f"{label_path}: {len(labels)} labels for {len(self.inputs[0])} sentences; rerun the prep")
        self.labels = np.array(labels, dtype=np.float32 if regression else np.int64)
        full = 1 + sum(np.asarray(ds.sizes) for ds in self.inputs) + (len(self.inputs) - 1)
        self.sizes = np.minimum(full, max_positions)
        cut = int((full > max_positions).sum())
        if cut:
            logger.warning("%s/%s: %d of %d samples longer than %d tokens are cut", data, split, cut,
                                                len(full), max_positions)
        self.bos, self.eos, self.pad = dictionary.bos(), dictionary.eos(), dictionary.pad()
        self.max_positions, self.shuffle, self.seed, self.epoch = max_positions, shuffle, seed, 1

    def __getitem__(self, index: int) -> Dict:
        parts = [self.inputs[0][index]]
        if len(self.inputs) > 1:
            parts += [torch.tensor([self.eos]), self.inputs[1][index]]
        tokens = prepare_tokens(torch.cat(parts), self.bos, self.max_positions)
        return {"id": index, "source": tokens, "target": self.labels[index]}

    def collater(self, samples: List[Dict]) -> Dict:
        if not samples:
            return {}
        source = data_utils.collate_tokens([s["source"] for s in samples], self.pad)
        return {"id": torch.tensor([s["id"] for s in samples]), "net_input": {"source": source, "padding_mask": source.eq(self.pad)},
                "target": torch.tensor(np.array([s["target"] for s in samples])), "nsentences": len(samples),
                "ntokens": int(source.ne(self.pad).sum())}
