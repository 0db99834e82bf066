"""Loading fairseq checkpoints with torch's safe unpickler (torch >= 2.6).

fairseq 0.12.x calls ``torch.load`` without ``weights_only``, so the safe loader
refuses the Python objects a fairseq checkpoint stores (argparse Namespace, OmegaConf
containers, fairseq meters). They are data classes, not code: allow-list them.
"""
from __future__ import annotations

import argparse
import collections
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
