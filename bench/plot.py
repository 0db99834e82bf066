"""Line charts of the benchmarks, drawn with matplotlib (the `plot` extra, as d2v_plugin.plot)."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple


def line_chart(series: Dict[str, List[Tuple[float, float]]], path: str, title: str, xlabel: str, ylabel: str,
               hline: Optional[Tuple[float, str]] = None, size: Tuple[float, float] = (9, 5.6)) -> None:
    """series: name -> [(x, y), ...] drawn as lines with markers; hline: (y, label), dashed across the plot."""
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font search logs at DEBUG when the root logger does
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=100)
    for name, pts in series.items():
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, marker="o", label=name)
    if hline:
        ax.axhline(hline[0], linestyle="--", color="grey", label=hline[1])
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
