"""The base of every d2v task config (no ``from __future__ import annotations`` here:
fairseq's argparse bridge needs real types on dataclass fields)."""
from dataclasses import dataclass, field

from fairseq.dataclass import FairseqDataclass
from omegaconf import II

# Fields copied from another config section by interpolation. fairseq's argparse bridge
# adds no flag for an interpolated field without help ("set elsewhere"); with help it adds a
# duplicate flag that fairseq-validate/-generate leave unset (null). So these have no help
# metadata; this table is their documentation (tests/test_fairseq.py reads it).
INTERPOLATED = {"progress_total": "optimization.max_update: the update count the done_pct / eta_min meters count towards"}


@dataclass
class RunConfig(FairseqDataclass):
    progress_total: int = field(default=II("optimization.max_update"))
