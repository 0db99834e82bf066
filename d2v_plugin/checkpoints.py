"""Checkpoints that load safely and survive a killed process.

* fairseq 0.12.x calls ``torch.load`` without ``weights_only``, so the safe loader
  (default since torch 2.6) refuses the Python objects a fairseq checkpoint stores
  (argparse Namespace, OmegaConf containers, fairseq meters). They are data classes,
  not code: allow-list them.
* fairseq writes the first checkpoint file of a save atomically (``.tmp`` + rename) but
  then *copies* it to the others (``checkpoint_last.pt``, ``checkpoint_best.pt``) with a
  plain ``shutil.copyfile``: a job killed during that copy leaves a truncated
  ``checkpoint_last.pt`` that the restart cannot load. Local copies are made atomic
  the same way (copy to ``DST.tmp``, then ``os.replace``).
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import typing

import torch


def _safe_globals() -> list:
    import omegaconf
    from omegaconf import base, dictconfig, listconfig, nodes

    found = [argparse.Namespace, collections.defaultdict, dict, list, typing.Any,
             dictconfig.DictConfig, listconfig.ListConfig, base.ContainerMetadata, base.Metadata]
    found += [getattr(nodes, n) for n in dir(nodes) if n.endswith("Node") and isinstance(getattr(nodes, n), type)]
    found.append(omegaconf.base.Node) if hasattr(omegaconf.base, "Node") else None
    try:
        from fairseq.logging import meters

        found += [getattr(meters, n) for n in dir(meters) if n.endswith("Meter") and isinstance(getattr(meters, n), type)]
    except ImportError:
        pass
    return found


if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals(_safe_globals())


def atomic_copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
    """``PathManager.copy`` for local files: the destination is either the old file or the
    complete new one, never a prefix."""
    if os.path.exists(dst_path) and not overwrite:
        return False
    tmp = dst_path + ".tmp"
    shutil.copyfile(src_path, tmp)
    os.replace(tmp, dst_path)
    return True


def _make_checkpoint_copies_atomic() -> None:
    from fairseq import file_io

    if file_io.IOPathManager is None and not getattr(file_io.PathManager.copy, "atomic", False):
        atomic_copy.atomic = True
        file_io.PathManager.copy = staticmethod(atomic_copy)


_make_checkpoint_copies_atomic()
