"""Record multi-update training trajectories of the official fairseq data2vec code.

Run in the reference environment (``../shared/reference/setup_reference.sh DIR``), not by CI:

    DIR/venv/bin/python tests/golden/make_trajectories.py --reference DIR --out tests/golden \
        [--family v2_audio ...] [--seed 1] [--steps 10] [--set KEY=VALUE ...]

For each family (v2_audio, v2_image, v2_text: ``data2vec_multi``; v1_audio: ``data2vec_audio``;
v1_text: ``data2vec_text``) it builds the official model at a tiny size with every dropout,
drop-path, layerdrop and mask noise off, draws ``--steps`` batches and their masks with the
official masking functions, and trains through fairseq's own ``Trainer`` (the one
``fairseq-train`` uses): ``task.train_step`` (``model.set_num_updates`` with the official EMA
step, the official ``model`` criterion's summed loss, backward), gradients divided by
sample_size, clipping, ``optimizer.step``, the lr scheduler's ``step_update``. The optimizer,
lr scheduler and ``clip_norm`` come from the modality's official YAML; only the run length is
shortened (``optimization.max_update = steps``, warmup 3 updates; tri_stage phases
[0.3, 0.4, 0.3]) so the lr moves within the
run. ``--set`` overrides anything (``model.loss_beta=4``, ``optimization.clip_norm=0``,
``optimizer.groups.default.optimizer.weight_decay=0.1``, ...). The file format is in README.md.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import numpy as np
import torch
import yaml

FAMILIES = ("v2_audio", "v2_image", "v2_text", "v1_audio", "v1_text")
OFFICIAL_YAML = {
    "v2_audio": "config/v2/base_audio_only_task.yaml",
    "v2_image": "config/v2/base_images_only_task.yaml",
    "v2_text": "config/v2/base_text_only_task.yaml",
    "v1_audio": "config/audio/pretraining/base_librispeech.yaml",
    "v1_text": "config/text/pretraining/base.yaml",
}
NO_DROPOUT_V2 = dict(encoder_dropout=0.0, post_mlp_drop=0.0, attention_dropout=0.0, activation_dropout=0.0,
                     dropout_input=0.0, layerdrop=0.0, start_drop_path_rate=0.0, end_drop_path_rate=0.0)
EMA = dict(ema_decay=0.9, ema_end_decay=0.99, ema_anneal_end_step=8)
MOD_OFF = dict(prenet_dropout=0.0, prenet_layerdrop=0.0, mask_noise_std=0.0, start_drop_path_rate=0.0,
               end_drop_path_rate=0.0)
DECODER_OFF = dict(input_dropout=0.0)
N_WORDS = 95  # text dictionaries: <s> <pad> </s> <unk> w0..w94 <mask>

MODEL = {
    "v2_audio": dict(
        _name="data2vec_multi", supported_modality="AUDIO", depth=2, embed_dim=64, num_heads=4, norm_eps=1e-5,
        average_top_k_layers=2, clone_batch=2, instance_norm_target_layer=True, loss_beta=0.0, loss_scale=None,
        ema_encoder_only=False, min_target_var=0.0, min_pred_var=0.0, **NO_DROPOUT_V2, **EMA,
        modalities={"audio": dict(feature_encoder_spec="[(32, 10, 5)] + [(32, 3, 2)] * 2", conv_pos_width=16,
                                  conv_pos_depth=2, conv_pos_groups=4, prenet_depth=0, mask_prob=0.5,
                                  mask_length=5, use_alibi_encoder=True, learned_alibi_scale=True,
                                  learned_alibi_scale_per_head=True, **MOD_OFF,
                                  decoder=dict(decoder_dim=32, decoder_groups=4, decoder_kernel=5,
                                               decoder_layers=2, **DECODER_OFF))}),
    "v2_image": dict(
        _name="data2vec_multi", supported_modality="IMAGE", depth=2, embed_dim=64, num_heads=4, norm_eps=1e-6,
        average_top_k_layers=2, clone_batch=2, instance_norm_target_layer=True, layer_norm_targets=True,
        loss_beta=0.0, loss_scale=None, cls_loss=0.01, ema_encoder_only=False, min_target_var=0.0,
        min_pred_var=0.0, **NO_DROPOUT_V2, **EMA,
        modalities={"image": dict(input_size=32, patch_size=8, in_chans=3, embed_dim=64, prenet_depth=1,
                                  inverse_mask=True, mask_prob=0.8, mask_prob_adjust=0.07, mask_length=3,
                                  ema_local_encoder=True, num_extra_tokens=1, init_extra_token_zero=False,
                                  use_alibi_encoder=False, **MOD_OFF,
                                  decoder=dict(decoder_dim=32, decoder_groups=4, decoder_kernel=3,
                                               decoder_layers=2, **DECODER_OFF))}),
    "v2_text": dict(
        _name="data2vec_multi", supported_modality="TEXT", depth=2, embed_dim=64, num_heads=4, norm_eps=1e-5,
        average_top_k_layers=2, clone_batch=2, instance_norm_target_layer=True, loss_beta=0.0, loss_scale=1.0,
        ema_encoder_only=True, min_target_var=0.0, min_pred_var=0.0, **NO_DROPOUT_V2, **EMA,
        modalities={"text": dict(max_source_positions=64, learned_pos=True, dropout=0.0, no_scale_embedding=True,
                                 layernorm_embedding=True, prenet_depth=1, mask_prob=0.48, mask_length=1, **MOD_OFF,
                                 decoder=dict(decoder_dim=32, decoder_groups=1, decoder_kernel=9, decoder_layers=2,
                                              decoder_residual=False, projection_layers=2, projection_ratio=2.0,
                                              **DECODER_OFF))}),
    "v1_audio": dict(
        _name="data2vec_audio", conv_feature_layers="[(32, 10, 5)] + [(32, 3, 2)] * 2", extractor_mode="layer_norm",
        encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=256, encoder_attention_heads=4,
        pos_conv_depth=2, conv_pos=16, conv_pos_groups=4, average_top_k_layers=2, instance_norm_target_layer=True,
        loss_beta=0.0, loss_scale=None, mask_prob=0.65, mask_length=10, require_same_masks=True, mask_dropout=0.0,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0, dropout_input=0.0,
        dropout_features=0.0, mask_channel_prob=0.0, ema_transformer_only=True, ema_layers_only=True,
        min_target_var=0.0, min_pred_var=0.0, **EMA),
    "v1_text": dict(
        _name="data2vec_text", max_positions=64, head_layers=2, average_top_k_layers=2, layer_norm_target_layer=True,
        loss_scale=1.0, loss_beta=4.0, ema_transformer_layers_only=True, **EMA,
        transformer=dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layernorm_embedding=True,
                         activation_fn="gelu", no_scale_embedding=True, max_source_positions=64,
                         encoder=dict(embed_dim=64, ffn_embed_dim=256, layers=2, attention_heads=4,
                                      normalize_before=False, learned_pos=True, layerdrop=0.0),
                         decoder=dict(input_dim=64, output_dim=64))),
}
BATCH = 2
AUDIO_LENGTHS = (3200, 4000)  # samples; a batch pads to its longest
TEXT_LENGTHS = (12, 20)  # tokens, <s> and </s> included


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", default=os.environ.get("D2V_REFERENCE", ""),
                    help="the folder setup_reference.sh made (DIR/root holds examples/data2vec)")
    ap.add_argument("--out", required=True, help="folder for traj_<family>.pt")
    ap.add_argument("--family", action="append", choices=FAMILIES, help="repeatable; default: all five")
    ap.add_argument("--seed", type=int, default=1, help="model construction, inputs and masks")
    ap.add_argument("--steps", type=int, default=10, help="optimizer updates (>= 8)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override any setting of the composed config (YAML value syntax), repeatable")
    ap.add_argument("--suffix", default="", help="appended to the file name (traj_<family><suffix>.pt)")
    return ap.parse_args(argv)


def import_official(reference: str) -> str:
    root = os.path.join(reference, "root")
    if not os.path.isdir(os.path.join(root, "examples", "data2vec")):
        raise SystemExit(f"error: {root}/examples/data2vec not found; run ../shared/reference/setup_reference.sh DIR "
                         "and pass --reference DIR")
    sys.path[:0] = [root, os.path.join(root, "examples", "data2vec")]
    np.float = float  # mae.py uses the removed alias (the reference copy also patches it)
    import examples.data2vec.models.data2vec2  # noqa: F401  (registers data2vec_multi)
    import examples.data2vec.models.data2vec_audio  # noqa: F401
    import examples.data2vec.models.data2vec_text  # noqa: F401
    return os.path.join(root, "examples", "data2vec")


def compose(family: str, official_dir: str, steps: int, seed: int, sets):
    """Full fairseq config: the official YAML's optimization / optimizer / lr_scheduler, the tiny
    model, the run shortened to ``steps`` updates, then ``--set``."""
    from fairseq.dataclass.configs import FairseqConfig
    from fairseq.dataclass.initialize import add_defaults
    from omegaconf import OmegaConf, open_dict
    from omegaconf._utils import get_yaml_loader

    y = OmegaConf.to_container(OmegaConf.load(os.path.join(official_dir, OFFICIAL_YAML[family])))  # as Hydra reads it
    cfg = OmegaConf.structured(FairseqConfig)
    with open_dict(cfg):
        cfg.common.cpu = True
        cfg.common.seed = seed
        cfg.optimization.lr = y["optimization"]["lr"]
        cfg.optimization.max_update = steps
        cfg.optimization.clip_norm = float(y["optimization"].get("clip_norm", 0.0))
        cfg.optimizer = y["optimizer"]
        cfg.lr_scheduler = y["lr_scheduler"]
        cfg.model = copy.deepcopy(MODEL[family])
        cfg.task = {"_name": "masked_lm", "data": "unused"} if "text" in family else None
        if isinstance(y["optimizer"], dict) and y["optimizer"]["_name"] == "composite":
            cfg.optimizer.groups.default.lr_scheduler.warmup_updates = 3
        elif y["lr_scheduler"]["_name"] == "tri_stage":
            cfg.lr_scheduler.phase_ratio = [0.3, 0.4, 0.3]  # the official [0.03, 0.9, 0.07] leaves 0 decay steps
        else:
            cfg.lr_scheduler.warmup_updates = 3
        for item in sets:
            key, _, value = item.partition("=")
            OmegaConf.update(cfg, key, yaml.load(value, Loader=get_yaml_loader()), merge=True, force_add=True)
    add_defaults(cfg)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    OmegaConf.set_struct(cfg, True)
    return cfg


def make_task(cfg, text: bool):
    from fairseq.data import Dictionary
    from fairseq.tasks import FairseqTask

    class Task(FairseqTask):  # the official tasks inherit train_step / optimizer_step from FairseqTask
        def __init__(self, task_cfg, dictionary):
            super().__init__(task_cfg)
            self.dictionary = dictionary

        @property
        def source_dictionary(self):
            return self.dictionary

        @property
        def target_dictionary(self):
            return self.dictionary

    d = None
    if text:
        d = Dictionary()
        for i in range(N_WORDS):
            d.add_symbol(f"w{i}")
        d.add_symbol("<mask>")
    return Task(cfg.task, d)


def draw_batches(family: str, cfg, model, steps: int, seed: int):
    """``steps`` batches, each {"net_input": official inputs, "mask": (B*C, T) bool, True = masked}."""
    from fairseq.data.data_utils import compute_block_mask_2d, compute_mask_indices

    g = torch.Generator().manual_seed(seed + 100)
    m = cfg.model
    batches = []
    for n in range(steps):
        ids = torch.arange(n * BATCH, (n + 1) * BATCH)
        if "audio" in family:
            lengths = torch.randint(AUDIO_LENGTHS[0], AUDIO_LENGTHS[1] + 1, (BATCH,), generator=g)
            lengths[0] = AUDIO_LENGTHS[1]
            L = int(lengths.max())
            src = torch.randn(BATCH, L, generator=g)
            pad = torch.arange(L)[None] >= lengths[:, None]
            src = src.masked_fill(pad, 0.0)
            frames = frame_count(family, model, lengths)
            T = int(frames.max())
            fpad = torch.arange(T)[None] >= frames[:, None]
            if family == "v2_audio":
                a, C = m.modalities.audio, m.clone_batch
                mask = compute_mask_indices((BATCH * C, T), fpad.repeat_interleave(C, 0), a.mask_prob, a.mask_length,
                                            min_masks=1, require_same_masks=True, mask_dropout=0.0,
                                            seed=seed, epoch=n, indices=ids.repeat_interleave(C) * C + torch.arange(C).repeat(BATCH))
                mask = torch.from_numpy(mask)
                net = {"source": src, "padding_mask": pad, "id": ids, "precomputed_mask": mask.float()}
            else:
                mask = torch.from_numpy(compute_mask_indices((BATCH, T), fpad, m.mask_prob, m.mask_length,
                                                             min_masks=1, require_same_masks=True, mask_dropout=0.0,
                                                             seed=seed, epoch=n, indices=ids))
                net = {"source": src, "padding_mask": pad, "mask_indices": mask}
        elif family == "v2_image":
            i, C = m.modalities.image, m.clone_batch
            src = torch.randn(BATCH, 3, i.input_size, i.input_size, generator=g)
            torch.manual_seed(seed * 1000 + n)
            L = (i.input_size // i.patch_size) ** 2
            mask = compute_block_mask_2d((BATCH * C, L), i.mask_prob, i.mask_length, i.mask_prob_adjust,
                                         i.inverse_mask, require_same_masks=True).bool()
            net = {"source": src, "id": ids, "precomputed_mask": mask.float()}
        else:
            lengths = torch.randint(TEXT_LENGTHS[0], TEXT_LENGTHS[1] + 1, (BATCH,), generator=g)
            lengths[0] = TEXT_LENGTHS[1]
            T = int(lengths.max())
            tokens = torch.randint(4, 4 + N_WORDS, (BATCH, T), generator=g)
            tokens[:, 0] = 0
            for b, n_tok in enumerate(lengths.tolist()):
                tokens[b, n_tok - 1] = 2
                tokens[b, n_tok:] = 1
            pad = tokens.eq(1)
            if family == "v2_text":
                C = m.clone_batch
                keep = int(T * (1 - m.modalities.text.mask_prob))
                noise = torch.rand(BATCH * C, T, generator=g)
                mask = torch.ones(BATCH * C, T, dtype=torch.bool)
                mask.scatter_(1, noise.argsort(1)[:, :keep], False)  # MAE-style: exactly T - keep masked per row
                net = {"source": tokens, "id": ids, "padding_mask": pad, "precomputed_mask": mask.float()}
            else:
                mask = torch.zeros(BATCH, T, dtype=torch.bool)
                for b, n_tok in enumerate(lengths.tolist()):  # spans of 4 over the words (not <s>, </s>)
                    starts = torch.nonzero(torch.rand(n_tok - 2, generator=g) < 0.35 / 4).flatten() + 1
                    for s in starts.tolist():
                        mask[b, s:min(s + 4, n_tok - 1)] = True
                    if not mask[b].any():
                        mask[b, 1] = True
                mask_idx = N_WORDS + 4
                net = {"src_tokens": tokens.masked_fill(mask, mask_idx), "target_tokens": tokens,
                       "src_lengths": lengths}
        batches.append({"id": ids, "net_input": net, "mask": mask.bool()})
    return batches


def frame_count(family: str, model, lengths: torch.Tensor) -> torch.Tensor:
    if family == "v1_audio":
        return model._get_feat_extract_output_lengths(lengths).long()
    enc = model.modality_encoders["AUDIO"]
    out = lengths.clone().float()
    for _, k, s in enc.feature_enc_layers:
        out = torch.floor((out - k) / s + 1)
    return out.long()


def plain(sd):
    """A state dict with the nested teacher dict, as plain fp32 tensors (clones)."""
    return {k: ({kk: vv.detach().clone() for kk, vv in v.items()} if isinstance(v, dict) else v.detach().clone())
            for k, v in sd.items()}


def weight_decay_of(trainer, model):
    """name -> the weight decay the built optimizer applies to that student parameter."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    opt = trainer.optimizer
    inner = opt.optimizers.values() if hasattr(opt, "optimizers") else [opt]
    for o in inner:
        for group in o.param_groups:
            for p in group["params"]:
                out[names[id(p)]] = float(group["weight_decay"])
    return out


def run_family(family: str, a, official_dir: str):
    from fairseq.criterions.model_criterion import ModelCriterion
    from fairseq.models import build_model
    from fairseq.trainer import Trainer
    from omegaconf import OmegaConf

    cfg = compose(family, official_dir, a.steps, a.seed, a.set)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    import random
    random.seed(a.seed)
    task = make_task(cfg, "text" in family)
    model = build_model(cfg.model, task)
    batches = draw_batches(family, cfg, model, a.steps, a.seed)
    initial = plain(model.state_dict())
    records = []

    class Recording(ModelCriterion):  # the official criterion, with its summed loss recorded
        def forward(self, model, sample, reduce=True):
            loss, sample_size, log = super().forward(model, sample, reduce)
            records.append({"loss": float(loss.detach()), "sample_size": float(sample_size)})
            return loss, sample_size, log

    criterion = Recording(task, loss_weights={}, log_keys=[])
    trainer = Trainer(cfg, task, model, criterion)
    norms = []
    clip = trainer.clip_grad_norm

    def recorded_clip(clip_norm):
        norm = clip(clip_norm)
        norms.append(float(norm))
        return norm

    trainer.clip_grad_norm = recorded_clip
    trainer.lr_step(1)  # what checkpoint_utils.load_checkpoint does before training starts
    trainer.begin_epoch(1)
    wd = weight_decay_of(trainer, model)
    lrs = []
    for b in batches:
        lrs.append(float(trainer.get_lr()))
        trainer.train_step([{"id": b["id"], "net_input": b["net_input"]}])
    model.train()
    model.set_num_updates(a.steps)  # the teacher step the next update would start with
    updates = [dict(r, lr=lr, grad_norm=gn) for r, lr, gn in zip(records, lrs, norms)]
    if len(updates) != a.steps:
        raise SystemExit(f"{family}: recorded {len(updates)} updates of {a.steps} (an update was skipped)")
    family_name = {"v1_audio": "data2vec1_audio", "v1_text": "data2vec1_text"}.get(family, "data2vec2")
    extra = {"seed": a.seed, "steps": a.steps, "sets": list(a.set)}
    if "text" in family:
        extra.update(dictionary_symbols=list(task.dictionary.symbols), pad_index=task.dictionary.pad(),
                     mask_index=task.dictionary.index("<mask>"))
    return {
        "format_version": 1, "kind": "trajectory", "name": f"traj_{family}", "family": family_name,
        "config": OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True),
        "training": {k: OmegaConf.to_container(cfg[k], resolve=True, enum_to_str=True)
                     for k in ("optimization", "optimizer", "lr_scheduler")},
        "official_yaml": OFFICIAL_YAML[family], "extra": extra,
        "weight_decay": wd, "initial": initial,
        "batches": [{"net_input": {k: v for k, v in b["net_input"].items() if k not in ("id", "precomputed_mask")},
                     "mask": b["mask"]} for b in batches],
        "updates": updates, "final": plain(model.state_dict()),
    }


def main(argv=None):
    a = parse_args(argv)
    if a.steps < 8:
        raise SystemExit("error: --steps must be >= 8")
    official_dir = import_official(a.reference)
    torch.set_num_threads(1)
    os.makedirs(a.out, exist_ok=True)
    for family in a.family or FAMILIES:
        r = run_family(family, a, official_dir)
        path = os.path.join(a.out, f"traj_{family}{a.suffix}.pt")
        torch.save(r, path)
        losses = ", ".join(f"{u['loss'] / u['sample_size']:.4f}" for u in r["updates"])
        print(f"wrote {path}: loss/sample_size per update {losses}")


if __name__ == "__main__":
    main()
