"""Training parity with the official fairseq data2vec code over several updates.

Every ``traj_*.pt`` in ``D2V_GOLDEN_DIR`` (default tests/golden/), recorded by
tests/golden/make_trajectories.py from the official code, is replayed through the plugin's
own fairseq path: the plugin's task, model (``d2v_multi``) and criterion (``d2v``), fairseq's
``Trainer`` (which builds the optimizer and lr scheduler from the config, as ``fairseq-train``
does) and the official run's optimizer, scheduler and clipping settings translated by
``d2v_plugin.official.convert_training``. Each update must reproduce the official lr, sample size
and loss (relative 1e-4) and the gradient norm; at the end every student and teacher tensor
must match within 1e-4; every parameter must get the official weight decay.
"""
import ast
import os
from pathlib import Path

import pytest
import torch
from fairseq.dataclass.configs import FairseqConfig
from fairseq.dataclass.initialize import add_defaults
from fairseq.trainer import Trainer
from omegaconf import OmegaConf, open_dict

from d2v_plugin import tasks as _tasks  # noqa: F401  (registers the d2v tasks)
from d2v_plugin.official import convert_config, convert_state_dict, convert_training

GOLDEN_DIR = Path(os.environ.get("D2V_GOLDEN_DIR", Path(__file__).parent / "golden"))
FILES = sorted(GOLDEN_DIR.glob("traj_*.pt"))
RTOL = 1e-4
FAMILIES = {"data2vec2", "data2vec1_audio", "data2vec1_text"}


def test_trajectories_present():
    """All five families (v2 audio, image, text; v1 audio, text) have a trajectory."""
    kinds = {kind(torch.load(p, weights_only=True)) for p in FILES}
    assert kinds >= {"v2_audio", "v2_image", "v2_text", "v1_audio", "v1_text"}, f"{GOLDEN_DIR}: found {sorted(kinds)}"


def kind(r) -> str:
    if r["family"] != "data2vec2":
        return {"data2vec1_audio": "v1_audio", "data2vec1_text": "v1_text"}[r["family"]]
    return "v2_" + str(r["config"]["supported_modality"]).lower()


def plugin_cfg(r, data: Path):
    """The fairseq config the plugin trains with: converted model, the plugin's pretraining task
    and ``d2v`` criterion, the official optimizer / scheduler / clipping in plugin form."""
    symbols = r["extra"].get("dictionary_symbols", [])
    model = convert_config(r["config"], r["family"], len(symbols))
    modality = model["modalities"]
    task = {"_name": f"d2v_{modality}_pretraining", "data": str(data)}
    if modality == "text":
        (data / "dict.txt").write_text("".join(f"{s} 1\n" for s in symbols[4:-1]))  # fairseq adds the specials, the task <mask>
        task["tokens_per_sample"] = model["text_max_positions"]
    if modality == "image":
        task["input_size"] = model["image_input_size"]
    training = convert_training(r["training"])
    cfg = OmegaConf.structured(FairseqConfig)
    with open_dict(cfg):
        cfg.common.cpu = True
        cfg.common.seed = r["extra"]["seed"]
        cfg.checkpoint.save_dir = str(data / "checkpoints")  # where the trainer would write crash.pt
        cfg.optimization = OmegaConf.merge(cfg.optimization, training["optimization"])
        cfg.optimizer = training["optimizer"]
        cfg.lr_scheduler = training["lr_scheduler"]
        cfg.model = {"_name": "d2v_multi", **model}
        cfg.task = task
        cfg.criterion = {"_name": "d2v"}
    add_defaults(cfg)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    OmegaConf.set_struct(cfg, True)
    return cfg


def plugin_input(r, batch):
    """The official batch in the plugin's form: source (clean tokens for v1 text), padding_mask, mask."""
    net, mask = batch["net_input"], batch["mask"]
    if r["family"] == "data2vec1_text":
        return {"source": net["target_tokens"], "mask": mask}
    out = {"source": net["source"], "mask": mask}
    if net.get("padding_mask") is not None:
        out["padding_mask"] = net["padding_mask"]
    return out


def replay(r, data: Path):
    """-> (per-update records, final plugin state dict, model, trainer)."""
    from fairseq import tasks

    cfg = plugin_cfg(r, data)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    model.load_state_dict(convert_state_dict(r["initial"], r["family"]))
    records = []
    criterion = task.build_criterion(cfg.criterion)
    forward = criterion.forward

    def recording(model, sample, reduce=True):
        loss, sample_size, log = forward(model, sample, reduce)
        records.append({"loss": float(loss.detach()), "sample_size": float(sample_size)})
        return loss, sample_size, log

    criterion.forward = recording
    trainer = Trainer(cfg, task, model, criterion)
    norms, clip = [], trainer.clip_grad_norm

    def recorded_clip(clip_norm):
        norm = clip(clip_norm)
        norms.append(float(norm))
        return norm

    trainer.clip_grad_norm = recorded_clip
    trainer.lr_step(1)
    trainer.begin_epoch(1)
    for i, batch in enumerate(r["batches"]):
        records_before = len(records)
        lr = float(trainer.get_lr())
        trainer.train_step([{"id": torch.arange(2), "net_input": plugin_input(r, batch)}])
        assert len(records) == records_before + 1, f"update {i} did not run"
        records[-1].update(lr=lr, grad_norm=norms[-1])
    return records, model.state_dict(), model, trainer


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_trajectory(path, tmp_path):
    r = torch.load(path, weights_only=True)
    records, state, model, trainer = replay(r, tmp_path)
    for i, (ours, ref) in enumerate(zip(records, r["updates"])):
        assert ours["lr"] == pytest.approx(ref["lr"], rel=1e-6, abs=1e-12), f"update {i}: lr {ours['lr']} != {ref['lr']}"
        assert ours["sample_size"] == ref["sample_size"], f"update {i}: sample_size {ours['sample_size']} != {ref['sample_size']}"
        assert rel(ours["loss"], ref["loss"]) <= RTOL, f"update {i}: loss {ours['loss']:.7g} != official {ref['loss']:.7g}"
        assert rel(ours["grad_norm"], ref["grad_norm"]) <= 1e-3, \
            f"update {i}: grad norm {ours['grad_norm']:.7g} != official {ref['grad_norm']:.7g}"
    final = convert_state_dict(r["final"], r["family"])
    teacher = final.pop("_ema")
    ours_teacher = state.pop("_ema")
    assert set(teacher) == set(ours_teacher), "teacher tensors differ in name"
    for where, ref_sd, our_sd in (("student", final, state), ("teacher", teacher, ours_teacher)):
        missing = set(ref_sd) - set(our_sd)
        assert not missing, f"{where}: no plugin counterpart for {sorted(missing)[:5]}"
        for k, v in ref_sd.items():
            diff = (our_sd[k].float() - v.float()).abs().max().item() if v.numel() else 0.0
            assert diff <= RTOL * max(1.0, v.abs().max().item()), f"{where} {k}: max abs diff {diff:.3g} after {len(records)} updates"
    check_weight_decay(r, model, trainer)


def check_weight_decay(r, model, trainer):
    """Each student parameter gets the weight decay the official optimizer gave it."""
    ours = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            ours[names[id(p)]] = group["weight_decay"]
    official = convert_state_dict({k: torch.tensor([v]) for k, v in r["weight_decay"].items()}, r["family"])
    official = {k: float(v.reshape(-1)[0]) for k, v in official.items()}
    assert set(official) <= set(ours), f"parameters without an optimizer group: {sorted(set(official) - set(ours))[:5]}"
    for k, wd in official.items():
        assert ours[k] == pytest.approx(wd), f"{k}: weight decay {ours[k]} != official {wd}"


# -- the shipped recipes and the official config semantics -------------------------------------
OFFICIAL_RECIPES = {  # shipped YAML -> the official YAML (fairseq/examples/data2vec/config) it reproduces
    "audio/base_v2": "v2/base_audio_only_task", "audio/large_v2": "v2/large_audio_only_task",
    "image/base_v2": "v2/base_images_only_task", "image/large_v2": "v2/large_images_only_task",
    "image/huge_v2": "v2/huge_images14_only_task", "text/base_v2": "v2/base_text_only_task",
    "text/large_v2": "v2/large_text_only_task", "audio/base_v1": "audio/pretraining/base_librispeech",
    "text/base_v1": "text/pretraining/base", "image/base_v1": "vision/pretraining/base_imagenet_d2v1",
}
IGNORED_TRAINING_KEYS = {"debug_param_names"}  # logging only


@pytest.mark.parametrize("ours", sorted(OFFICIAL_RECIPES))
def test_shipped_recipe_trains_like_the_official_one(ours):
    """optimizer, lr scheduler, lr, clipping and run length of every shipped Base/Large YAML equal
    the official YAML's (composite translated by convert_training); fairseq's defaults fill the rest."""
    import fairseq
    from fairseq.dataclass.utils import merge_with_parent
    from fairseq.optim import OPTIMIZER_DATACLASS_REGISTRY
    from fairseq.optim.lr_scheduler import LR_SCHEDULER_DATACLASS_REGISTRY

    official_dir = Path(fairseq.__file__).parent / "examples" / "data2vec" / "config"
    theirs = OmegaConf.to_container(OmegaConf.load(official_dir / f"{OFFICIAL_RECIPES[ours]}.yaml"))
    theirs = convert_training({k: theirs.get(k) or {} for k in ("optimization", "optimizer", "lr_scheduler")})
    mine = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "config" / "pretrain" / f"{ours}.yaml"))
    for section, registry in (("optimizer", OPTIMIZER_DATACLASS_REGISTRY), ("lr_scheduler", LR_SCHEDULER_DATACLASS_REGISTRY)):
        a, b = mine[section], theirs[section]
        assert a["_name"] == b["_name"], f"{ours}: {section} {a['_name']} != official {b['_name']}"
        full = lambda d: OmegaConf.to_container(merge_with_parent(registry[d["_name"]](), OmegaConf.create(  # noqa: E731
            {k: v for k, v in d.items() if k != "_name"})), resolve=False)
        a, b = full(a), full(b)
        for d in (a, b):  # fairseq's adam also takes betas as the string "(0.9,0.98)"
            if isinstance(d.get("adam_betas"), str):
                d["adam_betas"] = list(ast.literal_eval(d["adam_betas"]))
        diff = {k: (a[k], b[k]) for k in a if a[k] != b[k] and k not in ("lr", "max_update")}
        assert not diff, f"{ours}: {section} differs from the official recipe (ours, official): {diff}"
    a, b = mine["optimization"], theirs["optimization"]
    for k in set(b) - IGNORED_TRAINING_KEYS:
        assert a.get(k, {"update_freq": [1], "clip_norm": 0.0}.get(k)) == b[k], f"{ours}: optimization.{k} {a.get(k)} != official {b[k]}"


def test_official_loss_settings_keep_their_meaning():
    from d2v_plugin.official import _loss

    assert _loss({"loss_beta": 0, "loss_scale": 0}, "data2vec1_text") == {"loss": "l2", "loss_beta": 1.0, "loss_scale": None}
    assert _loss({"loss_beta": 4, "loss_scale": -1}, "data2vec1_text")["loss_scale"] is None  # <= 0: 1/sqrt(D)
    assert _loss({"loss_beta": 4, "loss_scale": 1}, "data2vec1_text") == {"loss": "smooth_l1", "loss_beta": 4.0, "loss_scale": 1.0}
    assert _loss({"loss_beta": 0.0, "loss_scale": None}, "data2vec2") == {"loss": "l2", "loss_beta": 1.0, "loss_scale": None}
    for family in ("data2vec2", "data2vec1_audio"):  # there 0 is taken literally: a zero loss
        with pytest.raises(ValueError, match="loss_scale=0 makes the official loss zero"):
            _loss({"loss_beta": 0, "loss_scale": 0}, family)


def test_official_target_norm_flags_combine_in_order():
    from d2v_plugin.official import _target_norms

    assert _target_norms({"instance_norm_target_layer": True}) == ("instance", "none")
    assert _target_norms({"instance_norm_target_layer": True, "layer_norm_target_layer": True,
                          "layer_norm_targets": True, "instance_norm_targets": True}) == ("instance_layer", "layer_instance")
    assert _target_norms({"batch_norm_target_layer": True, "instance_norm_target_layer": True}) == ("batch_instance", "none")
    with pytest.raises(ValueError, match="group_norm_target_layer"):
        _target_norms({"group_norm_target_layer": True})


def test_combined_norms_apply_left_to_right():
    import torch.nn.functional as F

    from d2v_plugin.modules.targets import build_targets, normalize

    x = torch.randn(2, 7, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1
    inst = F.instance_norm(x.transpose(1, 2)).transpose(1, 2)
    assert torch.allclose(normalize(x, "instance_layer"), F.layer_norm(inst, (5,)), atol=1e-6)
    both = build_targets([x, 2 * x], 2, "instance", "layer_instance")
    y = F.layer_norm(inst, (5,))  # mean of two identical instance-normed layers, then layer, then instance
    assert torch.allclose(both, F.instance_norm(y.transpose(1, 2)).transpose(1, 2), atol=1e-5)


def test_non_positive_loss_scale_is_refused():
    from d2v_plugin.models.settings import model_settings
    from d2v_plugin.modules.data2vec import Data2Vec

    from .conftest import tiny_cfg

    with pytest.raises(ValueError, match="loss_scale=0.0: give a positive factor, or null"):
        Data2Vec(model_settings(tiny_cfg(loss_scale=0.0)))


def test_official_weight_decay_survives_mixed_precision(tmp_path):
    """fairseq's FP16Optimizer trains fp32 master copies: one per parameter under bf16, one
    flattened tensor under fp16 (CUDA only, so built here as FP16Optimizer builds it). Either
    way every master weight gets the official decay, fp16 without ``fp16_no_flatten_grads``."""
    from fairseq import optim, tasks

    r = torch.load(GOLDEN_DIR / "traj_v2_image.pt", weights_only=True)
    cfg = plugin_cfg(r, tmp_path)
    with open_dict(cfg):
        cfg.common.bf16 = True
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    trainer = Trainer(cfg, task, model, task.build_criterion(cfg.criterion))
    groups = trainer.optimizer.fp32_optimizer.param_groups
    masters = [p for g in groups for p in g["params"]]
    trained = [p for p in model.parameters() if p.requires_grad]
    assert len(masters) == len(trained) and all(p.dtype == torch.float32 for p in masters)
    assert {g["weight_decay"] for g in groups} == set(r["weight_decay"].values()) == {0.05}
    flat = torch.nn.Parameter(torch.cat([p.detach().float().reshape(-1) for p in trained]))
    fp16 = optim.build_optimizer(cfg.optimizer, [flat])  # what FP16Optimizer.build_optimizer does with flatten
    assert fp16.supports_flat_params and [g["weight_decay"] for g in fp16.param_groups] == [0.05]


def test_official_settings_without_counterpart_are_named(caplog):
    from d2v_plugin.official import convert_config

    r = torch.load(GOLDEN_DIR / "traj_v2_audio.pt", weights_only=True)
    c = {**r["config"], "norm_affine": False}
    with pytest.raises(ValueError, match="norm_affine=False have no d2v_plugin counterpart"):
        convert_config(c, "data2vec2")
    c = {**r["config"], "end_of_block_targets": True}
    c["modalities"] = {"audio": {**r["config"]["modalities"]["audio"], "keep_masked_pct": 0.1}}
    convert_config(c, "data2vec2")
    assert "end_of_block_targets=True, modality keep_masked_pct=0.1 are not reproduced" in caplog.text


@pytest.mark.parametrize("name", ["traj_v2_image.pt", "traj_v2_audio.pt", "traj_v1_text.pt"])
def test_bf16_teacher_averages_the_fp32_masters(name, tmp_path):
    """Under --bf16 fairseq's FP16Optimizer steps fp32 master weights and casts them into a
    bf16 student; the teacher's EMA reads the masters, not their bf16 roundings."""
    from fairseq import tasks

    r = torch.load(GOLDEN_DIR / name, weights_only=True)
    cfg = plugin_cfg(r, tmp_path)
    with open_dict(cfg):
        cfg.common.bf16 = True
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    model.load_state_dict(convert_state_dict(r["initial"], r["family"]))
    trainer = Trainer(cfg, task, model, task.build_criterion(cfg.criterion))
    trainer.lr_step(1)
    trainer.begin_epoch(1)
    student = dict(model.named_parameters())
    rounded_gap = 0.0
    for batch in r["batches"]:
        before = {n: t.clone() for n, t in model.teacher.named_parameters()}
        trainer.train_step([{"id": torch.arange(2), "net_input": plugin_input(r, batch)}])
        masters = {id(p): m for p, m in zip(trainer.optimizer.fp16_params, trainer.optimizer.fp32_params)}
        lr = 1.0 - model.ema_decay
        assert 0 < lr < 1 and all(p.dtype == torch.bfloat16 for p in trainer.optimizer.fp16_params)
        worst_master = worst_rounded = 0.0
        for n, t in model.teacher.named_parameters():
            s = student[n]
            if id(s) not in masters or n.startswith(model.teacher.copy_prefixes):
                continue
            assert t.dtype == torch.float32
            from_master = before[n] * (1 - lr) + masters[id(s)].float() * lr
            from_rounded = before[n] * (1 - lr) + s.float() * lr
            worst_master = max(worst_master, float((t - from_master).abs().max().detach()))
            worst_rounded = max(worst_rounded, float((t - from_rounded).abs().max().detach()))
        assert worst_master < 1e-6, worst_master  # fp32 rounding of O(1) weights
        rounded_gap = max(rounded_gap, worst_rounded)
    assert rounded_gap > 1e-5  # what averaging the bf16 student instead would have missed
