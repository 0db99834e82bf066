"""Data preparation commands (``python -m d2v_plugin.prep.<name>``)."""
import os
import sys
from typing import List, Tuple


def write_rejected(dest: str, rejected: List[Tuple[str, str]]) -> None:
    """DEST/rejected.tsv (``path<TAB>reason``) and one stderr line per rejected file."""
    with open(os.path.join(dest, "rejected.tsv"), "w", encoding="utf-8") as f:
        f.write("".join(f"{p}\t{r}\n" for p, r in rejected))
    for p, r in rejected:
        print(f"rejected {p}: {r}", file=sys.stderr)
