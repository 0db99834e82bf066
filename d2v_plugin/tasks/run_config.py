"""The base of every d2v task config (no ``from __future__ import annotations`` here:
fairseq's argparse bridge needs real types on dataclass fields)."""
from dataclasses import dataclass, field

from fairseq.dataclass import FairseqDataclass
from omegaconf import II, MISSING

# Fields copied from another config section by interpolation. fairseq's argparse bridge
# adds no flag for an interpolated field without help ("set elsewhere"); with help it adds a
# duplicate flag that fairseq-validate/-generate leave unset (null). So these have no help
# metadata; this table is their documentation (tests/test_fairseq.py reads it).
INTERPOLATED = {"progress_total": "optimization.max_update: the update count the done_pct / eta_min meters count towards"}


@dataclass
class RunConfig(FairseqDataclass):
    progress_total: int = field(default=II("optimization.max_update"))


@dataclass
class LabelledAudioConfig(RunConfig):
    """What the labelled speech tasks (CTC, audio classification) read and skip."""

    data: str = field(default=MISSING, metadata={"help": "directory with the {split}.tsv manifests and their labels"})
    sample_rate: int = field(default=16000, metadata={"help": "required sample rate (Hz) of every file"})
    normalize: bool = field(
        default=True, metadata={"help": "zero-mean unit-variance waveforms; must match the pretrained model's setting"}
    )
    max_sample_size: int = field(
        default=480000, metadata={"help": "longer files are skipped, counted and logged (labelled audio is never cropped)"}
    )
    min_sample_size: int = field(default=0, metadata={"help": "shorter files are skipped, counted and logged"})
    seed: int = field(default=II("common.seed"), metadata={"help": "seed of the batch order (common.seed)"})
