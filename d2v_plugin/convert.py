"""``python -m d2v_plugin.convert --from-fairseq IN.pt --out OUT.pt``: an official fairseq data2vec
checkpoint (data2vec_multi, data2vec_audio, data2vec_text) or a fairseq RoBERTa one as a d2v_plugin checkpoint. The
mapping itself is ``d2v_plugin.official``."""
from __future__ import annotations

import torch

from .official import convert_checkpoint


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Convert an official fairseq data2vec checkpoint (data2vec_multi, "
                                             "data2vec_audio, data2vec_text) or a fairseq RoBERTa checkpoint into a d2v_plugin checkpoint.")
    ap.add_argument("--from-fairseq", required=True, metavar="IN.pt", help="the official checkpoint")
    ap.add_argument("--out", required=True, metavar="OUT.pt", help="where to write the d2v_plugin checkpoint")
    ap.add_argument("--dict", default="", help="text: the dict.txt the model was trained with (kept in the checkpoint)")
    ap.add_argument("--spm", default="", help="text: a sentencepiece model for d2v_plugin.extract (official text "
                                               "models use GPT-2 BPE, which the plugin's text tasks do not read)")
    a = ap.parse_args(argv)
    from . import checkpoints  # noqa: F401  (safe-loader allow-list)
    from .checkpoints import CheckpointError, load_checkpoint

    try:
        ckpt = load_checkpoint(a.from_fairseq, "an official data2vec or fairseq RoBERTa checkpoint", upgrade=False)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
    read = lambda p: open(p, "rb").read() if p else b""  # noqa: E731
    try:
        out = convert_checkpoint(ckpt, read(a.dict), read(a.spm))
    except (ValueError, KeyError) as e:
        raise SystemExit(f"error: {a.from_fairseq}: {e}")
    torch.save(out, a.out)
    teacher = "with" if "_ema" in out["model"] else "without"
    print(f"wrote {a.out}: {out['cfg']['converted_from']} -> d2v_multi ({out['cfg']['model']['modalities']}, "
          f"{out['cfg']['model']['algorithm']}), {teacher} its teacher")


if __name__ == "__main__":
    main()
