"""fairseq adapter: speech datasets read from wav2vec manifests.

Manifest ``{split}.tsv``: first line the root directory, then one
``relative/path<TAB>num_samples`` line per file. Audio must be 16 kHz; multi-channel
files are averaged to mono (logged). Files shorter than ``min_sample_size`` are
skipped (counted and logged); anything else wrong raises ``AudioDataError`` naming
the file, the manifest line and the fix.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional

import numpy as np
import soundfile as sf
import torch

from ..modules.audio import prepare_waveform
from ..modules.feature_extractor import ConvLayerSpec, conv_output_lengths
from ..modules.masking import MaskSettings, seeded_generator
from .base import ListedFilesDataset, read_root_list

logger = logging.getLogger(__name__)


class AudioDataError(ValueError):
    """A manifest or audio file that cannot be used as it is."""


def read_manifest(path: str):
    """-> root, [(relative path, num_samples, line number)]."""
    root, lines = read_root_list(path, AudioDataError, "manifest",
                                 "python -m d2v_plugin.prep.audio_manifest AUDIO_DIR --dest DIR", "audio")
    entries = []
    for n, line in lines:
        parts = line.split("\t")
        if len(parts) != 2 or not parts[1].strip().isdigit():
            raise AudioDataError(f"{path}, line {n}: expected 'relative/path<TAB>num_samples', got {line!r}")
        entries.append((parts[0], int(parts[1]), n))
    return root, entries


def wav_truncation(path: str) -> str:
    """For a RIFF/WAVE file whose ``data`` chunk is shorter than its header declares (a
    copy or download cut short), the reason; else "". libsndfile reads such files without
    complaint, returning only the samples present."""
    import struct

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return ""
        pos, block = 12, 0
        while pos + 8 <= size:
            f.seek(pos)
            cid, n = struct.unpack("<4sI", f.read(8))
            if cid == b"fmt ":
                fmt = f.read(min(n, 16))
                if len(fmt) >= 14:
                    block = struct.unpack("<H", fmt[12:14])[0]  # bytes per frame
            elif cid == b"data":
                have = size - pos - 8
                if n in (0, 0xFFFFFFFF) or n <= have:  # unknown length (streamed) or complete
                    return ""
                frames = (f"{n // block} frames declared, {have // block} present" if block else
                          f"{n} bytes declared, {have} present")
                return f"truncated: the header's data chunk says {frames}; re-copy or re-encode the file"
            pos += 8 + n + (n & 1)
    return ""


def load_audio(path: str, expected_rate: int, where: str) -> np.ndarray:
    """Read one file as float32 mono; ``where`` names the manifest line for errors."""
    try:
        wav, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types for unreadable files
        raise AudioDataError(f"{path} ({where}): cannot read audio: {e}. Re-encode it as wav/flac or remove the line.") from e
    truncated = wav_truncation(path)
    if truncated:
        raise AudioDataError(f"{path} ({where}): {truncated}, or remove the line.")
    if rate != expected_rate:
        raise AudioDataError(
            f"{path} ({where}): sample rate {rate} Hz, expected {expected_rate} Hz. Resample it "
            f"(e.g. `sox in.wav -r {expected_rate} out.wav`) and rebuild the manifest."
        )
    if wav.shape[0] == 0:
        raise AudioDataError(f"{path} ({where}): the file has no samples; remove it from the manifest.")
    if wav.shape[1] > 1:
        logger.warning("%s: %d channels, averaged to mono", path, wav.shape[1])
    wav = wav.mean(axis=1)
    if not np.isfinite(wav).all():
        raise AudioDataError(f"{path} ({where}): contains NaN or infinite samples; re-encode or remove it.")
    return wav


class AudioPretrainDataset(ListedFilesDataset):
    def __init__(
        self,
        manifest: str,
        sample_rate: int = 16000,
        max_sample_size: int = 320000,
        min_sample_size: int = 32000,
        normalize: bool = True,
        pad: bool = False,
        seed: int = 1,
        shuffle: bool = True,
    ):
        super().__init__()
        self.manifest, self.sample_rate, self.normalize, self.pad = manifest, sample_rate, normalize, pad
        self.max_sample_size, self.min_sample_size, self.seed, self.shuffle = max_sample_size, min_sample_size, seed, shuffle
        root, entries = read_manifest(manifest)
        self.check_exist(manifest, root, entries, AudioDataError, "audio_manifest")
        self.num_entries = len(entries)  # before any skip: label files line up with all entries
        self.root = root
        self.files = [e[0] for e in entries]
        self.lines = [e[2] for e in entries]  # manifest line numbers, for error messages
        self.entry_ids = np.arange(len(entries))  # position among the manifest's entries (label line)
        self.sizes = np.array([e[1] for e in entries], dtype=np.int64)
        self.cropped_sizes = np.minimum(self.sizes, max_sample_size)  # what a batch holds of each file
        self._keep(self.sizes >= min_sample_size, f"shorter than min_sample_size={min_sample_size} samples",
                   "lower task.min_sample_size")
        self.epoch = 1
        self.conv_spec: Optional[List[ConvLayerSpec]] = None
        self.masking: Optional[MaskSettings] = None

    def _keep(self, keep: np.ndarray, why: str, fix: str) -> None:
        """Drop the files where ``keep`` is False: a counted and logged skip."""
        if keep.all():
            return
        logger.warning("%s: skipped %d of %d files %s", self.manifest, int((~keep).sum()), len(keep), why)
        if not keep.any():
            raise AudioDataError(f"{self.manifest}: every file is {why}; {fix}")
        idx = np.flatnonzero(keep)
        self.files, self.lines = [self.files[i] for i in idx], [self.lines[i] for i in idx]
        self.entry_ids, self.sizes, self.cropped_sizes = self.entry_ids[idx], self.sizes[idx], self.cropped_sizes[idx]

    def set_masking(self, conv_spec: List[ConvLayerSpec], masking: MaskSettings) -> None:
        """Let the collater (data workers) draw the model's masks."""
        self.conv_spec, self.masking = conv_spec, masking

    def __getitem__(self, index: int) -> Dict:
        path = os.path.join(self.root, self.files[index])
        where = f"{self.manifest}, line {self.lines[index]}"
        wav = load_audio(path, self.sample_rate, where)
        if len(wav) != self.sizes[index]:
            raise AudioDataError(
                f"{path} ({where}): has {len(wav)} samples but the manifest says {self.sizes[index]}; rebuild the manifest."
            )
        source = torch.from_numpy(wav)
        return {"id": index, "source": prepare_waveform(source, self.normalize)}

    def size(self, index: int) -> int:
        return int(self.cropped_sizes[index])

    def num_tokens(self, index: int) -> int:
        return self.size(index)

    def filter_indices_by_size(self, indices, max_sizes):
        """fairseq's default compares ``self.sizes`` (whole files) with ``max_positions``, so a
        long file that pretraining would crop was dropped; compare what a batch holds, and
        name whatever is still too long (a counted, logged skip)."""
        too_long = indices[self.cropped_sizes[indices] > max_sizes] if max_sizes is not None else indices[:0]
        if len(too_long):
            logger.warning("%s: skipped %d files longer than max_positions=%s after cropping to max_sample_size=%d: "
                           "lines %s", self.manifest, len(too_long), max_sizes, self.max_sample_size,
                           ", ".join(str(self.lines[i]) for i in too_long[:10]))
        return indices[~np.isin(indices, too_long)], too_long.tolist()

    def num_tokens_vec(self, indices):
        return self.cropped_sizes[indices]

    def ordered_indices(self):
        if not self.shuffle:
            return np.argsort(self.cropped_sizes, kind="stable")
        rng = np.random.default_rng([self.seed, self.epoch])
        return np.ascontiguousarray(np.lexsort((rng.permutation(len(self)), self.cropped_sizes))[::-1])

    def collater(self, samples: List[Dict]) -> Dict:
        if not samples:
            return {}
        lengths = [len(s["source"]) for s in samples]
        target = min(max(lengths), self.max_sample_size) if self.pad else min(min(lengths), self.max_sample_size)
        source = torch.zeros(len(samples), target)
        padding = torch.zeros(len(samples), target, dtype=torch.bool)
        for i, s in enumerate(samples):
            wav, n = s["source"], lengths[i]
            if n > target:  # random crop, reproducible from (seed, epoch, id)
                g = seeded_generator(self.seed, self.epoch, s["id"])
                start = int(torch.randint(0, n - target + 1, (), generator=g))
                wav, n = wav[start : start + target], target
            source[i, :n] = wav
            padding[i, n:] = True
        ids = torch.tensor([s["id"] for s in samples])
        net_input = {"source": source}
        if padding.any():
            net_input["padding_mask"] = padding
        if self.masking is not None:
            frames = conv_output_lengths((~padding).sum(1), self.conv_spec)  # the longest row is `target` long
            g = seeded_generator(self.seed, self.epoch, *ids.tolist())
            net_input["mask"] = self.masking(frames, int(frames.max()), g)
        return {"id": ids, "net_input": net_input}


class LabelLinesAudioDataset(AudioPretrainDataset):
    """Audio with one label line per manifest entry (line i of the labels file labels entry i
    of ``{split}.tsv``), parsed by ``parse``. Batches are padded, never cropped: files longer
    than ``max_sample_size`` are skipped (counted and logged)."""

    MADE_BY = ""  # how to write the labels file (for the error lines)

    def __init__(self, manifest: str, labels_path: str, sample_rate: int, max_sample_size: int, min_sample_size: int,
                 normalize: bool, seed: int, shuffle: bool):
        super().__init__(manifest, sample_rate, max_sample_size, min_sample_size, normalize, True, seed, shuffle)
        if not os.path.isfile(labels_path):
            raise AudioDataError(f"{labels_path}: labels not found; {self.MADE_BY}")
        with open(labels_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        if len(lines) != self.num_entries:
            raise AudioDataError(f"{labels_path} has {len(lines)} lines but {manifest} lists {self.num_entries} files; "
                                 f"{self.MADE_BY} so they line up")
        self.labels = [self.parse(lines[i], f"{labels_path}, line {i + 1}") for i in self.entry_ids]
        self._keep(self.sizes <= max_sample_size,
                   f"longer than max_sample_size={max_sample_size} samples (labelled audio is never cropped)",
                   "raise task.max_sample_size")

    def parse(self, line: str, where: str):
        raise NotImplementedError

    def _keep(self, keep: np.ndarray, why: str, fix: str) -> None:
        super()._keep(keep, why, fix)
        if hasattr(self, "labels"):
            self.labels = [lab for lab, k in zip(self.labels, keep) if k]

    def __getitem__(self, index: int) -> Dict:
        return {**super().__getitem__(index), "label": self.labels[index]}


class LabelledAudioDataset(LabelLinesAudioDataset):
    """Audio with a token sequence per manifest entry (line i of ``{split}.{labels}``), for CTC
    fine-tuning."""

    MADE_BY = "write them with `python -m d2v_plugin.prep.asr_labels TRANSCRIPTS --manifest-dir DIR`"

    def __init__(self, manifest: str, labels_path: str, dictionary, sample_rate: int = 16000,
                 max_sample_size: int = 480000, min_sample_size: int = 0, normalize: bool = True,
                 seed: int = 1, shuffle: bool = True):
        self.dictionary, self.pad_index = dictionary, dictionary.pad()
        super().__init__(manifest, labels_path, sample_rate, max_sample_size, min_sample_size, normalize, seed, shuffle)

    def parse(self, line: str, where: str) -> torch.Tensor:
        d = self.dictionary
        tokens = d.encode_line(line, add_if_not_exist=False, append_eos=False).long()
        unknown = [s for s, t in zip(line.split(), tokens.tolist()) if t == d.unk()]
        if unknown or len(tokens) == 0:
            what = f"symbols {sorted(set(unknown))} not in the dictionary" if unknown else "no symbols"
            raise AudioDataError(f"{where}: {what}; fix the transcript and re-run d2v_plugin.prep.asr_labels")
        return tokens

    def collater(self, samples: List[Dict]) -> Dict:
        batch = super().collater(samples)
        if not batch:
            return batch
        labels = [s["label"] for s in samples]
        batch["target_lengths"] = torch.tensor([len(t) for t in labels])
        batch["target"] = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=self.pad_index)
        batch["ntokens"] = int(batch["target_lengths"].sum())
        return batch


class ClassifiedAudioDataset(LabelLinesAudioDataset):
    """Audio with one class per manifest entry (line i of ``{split}.label`` names one of
    ``labels``), for audio classification."""

    MADE_BY = "write one class name per manifest line (python -m d2v_plugin.samples commands makes an example)"

    def __init__(self, manifest: str, labels_path: str, labels: List[str], sample_rate: int = 16000,
                 max_sample_size: int = 480000, min_sample_size: int = 0, normalize: bool = True,
                 seed: int = 1, shuffle: bool = True):
        self.classes = {name: i for i, name in enumerate(labels)}
        super().__init__(manifest, labels_path, sample_rate, max_sample_size, min_sample_size, normalize, seed, shuffle)

    def parse(self, line: str, where: str) -> int:
        if line.strip() not in self.classes:
            raise AudioDataError(f"{where}: class {line.strip()!r} is not in labels.txt ({', '.join(list(self.classes)[:10])}); "
                                 "add it there or fix the label")
        return self.classes[line.strip()]

    def collater(self, samples: List[Dict]) -> Dict:
        batch = super().collater(samples)
        if batch:
            batch["target"] = torch.tensor([s["label"] for s in samples])
            batch["ntokens"] = len(samples)
        return batch
