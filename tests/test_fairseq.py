"""The plugin through fairseq: registries, configs, the trainer, and the real binaries."""
import glob
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from d2v_plugin.models.config import D2vMultiConfig
from d2v_plugin.models.d2v_multi import D2vMultiModel
from d2v_plugin.modules.ema import ema_decay_at
from d2v_plugin.tasks.audio_pretraining import D2vAudioPretrainingConfig, D2vAudioPretrainingTask
from d2v_plugin.userdir import user_dir

from .conftest import BIN, REPO, V1_FLAGS, run, train_args

CONFIGS = sorted(glob.glob(os.path.join(REPO, "config", "pretrain", "audio", "*.yaml")))
def test_registries_hold_plugin_classes():
    from fairseq.criterions import CRITERION_REGISTRY
    from fairseq.models import MODEL_REGISTRY
    from fairseq.tasks import TASK_REGISTRY

    from d2v_plugin.criterions.d2v import D2vCriterion

    assert MODEL_REGISTRY["d2v_multi"] is D2vMultiModel
    assert TASK_REGISTRY["d2v_audio_pretraining"] is D2vAudioPretrainingTask
    assert CRITERION_REGISTRY["d2v"] is D2vCriterion


@pytest.mark.slow
def test_userdir_module_prints_package_dir():
    out = subprocess.run([sys.executable, "-m", "d2v_plugin.userdir"], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == user_dir() and os.path.isfile(os.path.join(user_dir(), "__init__.py"))


def test_every_field_has_help():
    from fairseq.criterions import CRITERION_DATACLASS_REGISTRY
    from fairseq.models import MODEL_DATACLASS_REGISTRY
    from fairseq.tasks import TASK_DATACLASS_REGISTRY

    from d2v_plugin.tasks.run_config import INTERPOLATED

    plugin = [reg[name] for reg in (MODEL_DATACLASS_REGISTRY, TASK_DATACLASS_REGISTRY, CRITERION_DATACLASS_REGISTRY)
              for name in reg if name.startswith("d2v")]
    assert len(plugin) == 16  # 5 models, 8 tasks, 3 criteria
    for dc in (D2vMultiConfig, D2vAudioPretrainingConfig, *plugin):
        missing = [n for n, f in dc.__dataclass_fields__.items() if not n.startswith("_") and not f.metadata.get("help")
                   and n not in INTERPOLATED]  # interpolated from another section, documented there
        assert not missing, f"{dc.__name__}: fields without help {missing}"


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_yaml_composes(path):
    y = OmegaConf.load(path)
    assert OmegaConf.is_missing(y.task, "data") and OmegaConf.is_missing(y.common, "user_dir")
    assert "/private/" not in open(path).read() and "/checkpoint/" not in open(path).read()
    model_cfg = OmegaConf.merge(OmegaConf.structured(D2vMultiConfig), {k: v for k, v in y.model.items() if k != "_name"})
    model = D2vMultiModel(OmegaConf.to_object(model_cfg)) if "tiny" in path else None
    if model is not None:
        assert model.algorithm == model_cfg.algorithm
    task = OmegaConf.to_container(y.task)
    assert task.pop("_name") == "d2v_audio_pretraining"
    OmegaConf.merge(OmegaConf.structured(D2vAudioPretrainingConfig), task)


@pytest.mark.parametrize("algorithm", ["v1", "v2"])
def test_teacher_steps_once_per_update_with_update_freq(speech_corpus, algorithm):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    extra = ["--update-freq", "2", "--cpu"] + (V1_FLAGS if algorithm == "v1" else [])
    args = options.parse_args_and_arch(options.get_training_parser(), train_args(speech_corpus / "manifest", *extra))
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    trainer = Trainer(cfg, task, model, task.build_criterion(cfg.criterion))
    it = trainer.get_train_iterator(epoch=1).next_epoch_itr(shuffle=False)
    for update in (1, 2):
        before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
        trainer.train_step([next(it), next(it)])  # update_freq 2: two micro-batches, one update
        assert model.ema_steps == update and trainer.get_num_updates() == update
        d = ema_decay_at(update, 0.9, 0.99, 10)
        student = dict(model.named_parameters())
        for k, v in model.teacher.state_dict().items():
            copied = algorithm == "v1" and ".pos_conv." in k
            expected = student[k].detach() if copied else d * before[k] + (1 - d) * student[k].detach()
            assert torch.allclose(v, expected, atol=1e-6), k


def check_checkpoint(path):
    """Reload with fairseq's own loader; the teacher is fp32 and equals the saved _ema."""
    from fairseq import checkpoint_utils

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(path)])
    state = torch.load(path, weights_only=True)  # the safe loader accepts it (plugin allow-list)
    teacher = models[0].teacher.state_dict()
    assert set(teacher) == set(state["model"]["_ema"])
    for k, v in state["model"]["_ema"].items():
        assert v.dtype == torch.float32 and torch.equal(teacher[k], v), k
    return models[0], cfg


@pytest.mark.slow
def test_fairseq_hydra_train_tiny_v2(speech_corpus, tmp_path):
    log = run([os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", os.path.join(REPO, "config/pretrain/audio"),
               "--config-name", "tiny_v2", f"task.data={speech_corpus / 'manifest'}", f"common.user_dir={user_dir()}",
               f"checkpoint.save_dir={tmp_path / 'ckpt'}", f"hydra.run.dir={tmp_path / 'hydra'}",
               "optimization.max_update=6", "dataset.num_workers=0", "model.depth=2", "model.average_top_k_layers=2"], REPO)
    assert "done training" in log
    model, cfg = check_checkpoint(tmp_path / "ckpt" / "checkpoint_last.pt")
    assert cfg.model.algorithm == "v2" and model.ema_steps == 0  # fresh process: no steps yet


@pytest.mark.parametrize("algorithm", ["v1", "v2"])
def test_fairseq_train_flags(pretrained, algorithm):
    path, log = pretrained(algorithm)
    assert "done training" in log and "target_var" in log
    _, cfg = check_checkpoint(path)
    assert cfg.model.algorithm == algorithm and cfg.model.depth == 2
    assert cfg.model.audio_use_alibi is (algorithm == "v2")
