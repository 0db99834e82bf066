"""What the plugin's datasets share: files listed under a root, epochs, and batching
that never drops the last partial batch."""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import numpy as np

try:
    from fairseq.data import FairseqDataset
except ImportError:  # without fairseq only the file readers of data/ are used (extraction)
    from torch.utils.data import Dataset as FairseqDataset


def read_root_list(path: str, error: type, name: str, made_by: str, root_kind: str) -> Tuple[str, List[Tuple[int, str]]]:
    """A list file whose first line is the root folder and then one entry per line (wav2vec
    manifests, image lists) -> root, [(line number, line)] with blank lines skipped; a
    missing or empty file raises ``error`` naming it and the command that makes it."""
    if not os.path.isfile(path):
        raise error(f"{path}: {name} not found. Create it with `{made_by}`")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not lines:
        raise error(f"{path}: empty {name}; its first line must be the {root_kind} root directory")
    return lines[0].strip(), [(n, line) for n, line in enumerate(lines[1:], start=2) if line.strip()]


class CompleteBatches:
    """fairseq's batching without its loss of the last partial batch, batches made again
    every epoch."""

    @property
    def can_reuse_epoch_itr_across_epochs(self) -> bool:
        """No: the order (``ordered_indices``) depends on the epoch. fairseq's default reuses
        epoch 1's batches (only shuffling them) for the rest of a run, but makes fresh ones
        when a run resumes, so a restarted run saw other batches than an uninterrupted one."""
        return False

    def batch_by_size(self, indices, max_tokens=None, max_sentences=None, required_batch_size_multiple=1):
        """fairseq's batching, plus the final partial batch that fairseq 0.12.3 drops when it is
        not a multiple of ``required_batch_size_multiple`` (it would lose samples in evaluation)."""
        batches = list(super().batch_by_size(indices, max_tokens, max_sentences, required_batch_size_multiple))
        batched = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
        rest = np.asarray(indices)[~np.isin(indices, batched)]
        if len(rest):
            batches.append(rest.astype(np.int64))
        return batches


class ListedFilesDataset(CompleteBatches, FairseqDataset):
    """``self.files`` (paths relative to ``self.root``) with ``self.epoch``."""

    files: Sequence[str] = ()
    epoch: int = 1

    @staticmethod
    def check_exist(list_path: str, root: str, entries: Sequence[Tuple], error: type, tool: str) -> None:
        """entries: (relative path, ..., line number); raise ``error`` listing missing files."""
        missing = [(e[0], e[-1]) for e in entries if not os.path.isfile(os.path.join(root, e[0]))]
        if missing:
            shown = ", ".join(f"line {n}: {os.path.join(root, rel)}" for rel, n in missing[:5])
            raise error(f"{list_path}: {len(missing)} file(s) listed do not exist ({shown}). "
                        f"Fix the root directory on line 1 or rebuild the list with d2v_plugin.prep.{tool}.")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)
