"""The README's own commands, as typed, from the root of a fresh copy of the repository.

Every runnable shell block of the README's quick-start sections (sample data, prep,
`fairseq-hydra-train` with relative paths, `fairseq-generate`, `fairseq-validate`) runs in
order with bash, in a copy of the working tree (what a clone holds). The only edits are
smaller sizes (``SIZES``) and two updates per training run; each block's relative output
paths must exist under the copy's root afterwards (Hydra must not have moved them)."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow

# (pattern, replacement) on each joined command: sizes only
SIZES = [
    (r"(samples speech .*)--n 400", r"\1--n 40"),
    (r"(samples images .*)--n 5000", r"\1--n 160"),
    (r"(samples text --out \S+)$", r"\1 --n 30"),
    (r"--vocab-size 8000", "--vocab-size 500"),
    (r"--labelled 1000", "--labelled 40"),
]
TRAIN_SIZE = " optimization.max_update=2 dataset.num_workers=0"


def readme_commands():
    """[(section, [command, ...])] of the quick-start blocks: bash blocks with a d2v_plugin or
    fairseq command, outside the demo's (data/demo, `a|b` choices) and with no elided `...`."""
    section, inside, body, raw = "", False, [], []
    for line in open(os.path.join(REPO, "README.md"), encoding="utf-8"):
        if line.startswith("```"):
            if inside:
                raw.append((section, "".join(body)))
            inside, body = not inside, []
        elif inside:
            body.append(line)
        elif line.startswith("## "):
            section = line[3:].strip()
    blocks = []
    for section, body in raw:
        if "data/demo" in body or "import " in body or not re.search(r"fairseq-|python -m d2v_plugin", body):
            continue
        joined = re.sub(r"\\\n\s*", "", body)
        cmds = []
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if not line or line.startswith("#") or line.startswith("pip install") or " ..." in line:
                continue
            if re.search(r"\S\|\S", line):  # `a|b` alternatives are documentation, not a command
                continue
            for pattern, repl in SIZES:
                line = re.sub(pattern, repl, line)
            if line.startswith("fairseq-hydra-train"):
                line += TRAIN_SIZE
            cmds.append(line)
        if cmds:
            blocks.append((section, cmds))
    return blocks


def test_readme_blocks_are_found():
    sections = [s for s, _ in readme_commands()]
    assert any(s.startswith("Speech") for s in sections) and "Images" in " ".join(sections) and "Text" in sections
    assert sum(len(c) for _, c in readme_commands()) >= 15


def test_readme_commands_run_as_written_from_a_fresh_copy(tmp_path):
    root = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if os.path.isfile(os.path.join(REPO, f)):
            os.makedirs(root / os.path.dirname(f), exist_ok=True)
            shutil.copy2(os.path.join(REPO, f), root / f)
    env = dict(os.environ, PYTHONPATH=str(root), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    script = ["set -euo pipefail"]
    for section, cmds in readme_commands():
        script += [f"echo '### {section}'"] + cmds
    proc = subprocess.run(["bash", "-c", "\n".join(script)], cwd=root, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    for path in ("data/ckpt/checkpoint_last.pt", "data/ft/checkpoint_best.pt", "data/img_pt/checkpoint_last.pt",
                 "data/img_ft/checkpoint_best.pt", "data/txt_pt/checkpoint_last.pt", "data/txt_ft/checkpoint_best.pt",
                 "data/multi_pt/checkpoint_last.pt"):
        assert (root / path).is_file(), f"{path} missing; output:\n{out[-3000:]}"
    assert not list(root.glob("outputs/*/*/data")), "a relative path landed under Hydra's outputs/"
    assert "WER" in out and "| top1 " in out
