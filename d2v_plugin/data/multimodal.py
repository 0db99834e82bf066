"""fairseq adapter: one dataset over several modalities' datasets, every batch from one of them.

Each modality batches its own samples (its own collater, masks drawn in the data workers);
an epoch holds ``ratio_m / sum(ratios)`` of its batches from modality m (a modality's
batches are repeated in a fresh order, or a random subset is taken, to reach its share of
as many batches as the datasets hold together). fairseq then shuffles the batch order.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
from fairseq.data import FairseqDataset


class MultiModalityDataset(FairseqDataset):
    def __init__(self, datasets: Dict[str, FairseqDataset], ratios: Dict[str, float], batch_sizes: Dict[str, int],
                 seed: int = 1):
        """datasets / ratios / batch_sizes (0 = fairseq's dataset.batch_size): keyed by modality."""
        super().__init__()
        self.names = list(datasets)
        if not self.names or any(ratios[m] <= 0 for m in self.names):
            raise ValueError(f"every modality with data needs a ratio > 0 (got {ratios})")
        self.datasets, self.ratios, self.batch_sizes, self.seed, self.epoch = datasets, ratios, batch_sizes, seed, 1
        self.offsets = np.cumsum([0] + [len(datasets[m]) for m in self.names])

    def locate(self, index: int):
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.names[k], index - int(self.offsets[k])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> Dict:
        m, local = self.locate(index)
        return {**self.datasets[m][local], "modality": m}

    def collater(self, samples: List[Dict]) -> Dict:
        if not samples:
            return {}
        names = {s["modality"] for s in samples}
        if len(names) != 1:
            raise ValueError(f"a batch mixes modalities {sorted(names)}; batches must come from batch_by_size")
        m = names.pop()
        batch = self.datasets[m].collater([{k: v for k, v in s.items() if k != "modality"} for s in samples])
        batch["net_input"]["modality"] = m
        return batch

    def num_tokens(self, index: int) -> int:
        m, local = self.locate(index)
        return self.datasets[m].num_tokens(local)

    def size(self, index: int):
        m, local = self.locate(index)
        return self.datasets[m].size(local)

    def ordered_indices(self):
        return np.arange(len(self), dtype=np.int64)

    @property
    def can_reuse_epoch_itr_across_epochs(self) -> bool:
        return False  # batches depend on the epoch (see data/base.py CompleteBatches)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for ds in self.datasets.values():
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(epoch)

    def batch_by_size(self, indices, max_tokens=None, max_sentences=None, required_batch_size_multiple=1):
        indices = np.asarray(indices)
        per_modality: Dict[str, List[np.ndarray]] = {}
        for k, m in enumerate(self.names):
            lo, hi = self.offsets[k], self.offsets[k + 1]
            ds = self.datasets[m]
            local = ds.ordered_indices()
            local = local[np.isin(local, indices[(indices >= lo) & (indices < hi)] - lo)]
            bsz = self.batch_sizes.get(m) or max_sentences
            per_modality[m] = [b + lo for b in ds.batch_by_size(local, max_tokens, bsz, required_batch_size_multiple)]
        total = sum(len(b) for b in per_modality.values())
        weight = sum(self.ratios[m] for m in self.names)
        rng = np.random.default_rng([self.seed, self.epoch])
        batches: List[np.ndarray] = []
        for m in self.names:
            have = per_modality[m]
            want = max(1, round(total * self.ratios[m] / weight))
            order = np.concatenate([rng.permutation(len(have)) for _ in range(-(-want // max(len(have), 1)))])[:want]
            batches += [have[i] for i in order]
        return batches
