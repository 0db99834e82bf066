"""Images: masks, positions, augmentation, bad files, the encoder, and the fairseq binaries."""
import glob
import os
import subprocess

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from d2v_plugin.data.image import ImageDataError, ImageDataset, center_crop, load_image, random_resized_crop
from d2v_plugin.modules.masking import MaskSettings, beit_mask_2d, block_mask_2d
from d2v_plugin.modules.positional import resize_grid, sincos_2d
from d2v_plugin.prep.image_folder import write_lists
from d2v_plugin.userdir import user_dir

from .conftest import BIN, REPO, run, tiny_cfg

IMAGE = dict(modalities="image", image_input_size=16, image_patch_size=4, image_prenet_depth=1, image_decoder_dim=16,
             image_decoder_layers=1, image_decoder_groups=4, image_mask_prob=0.75, image_mask_length=2)


# -- masks -----------------------------------------------------------------------------
def test_inverse_block_mask_has_exact_visible_count_in_blocks():
    g = torch.Generator().manual_seed(0)
    m = block_mask_2d(5, (14, 14), 0.8, 3, 0.07, inverse=True, generator=g)
    assert m.shape == (5, 196) and (m.sum(1) == 196 - int(196 * 0.2)).all()  # 157 masked, as the reference
    visible = (~m[0]).view(14, 14)
    # visible patches come in blocks: most have a visible neighbour
    padded = torch.nn.functional.pad(visible.float()[None, None], (1, 1, 1, 1))
    neighbours = torch.nn.functional.conv2d(padded, torch.ones(1, 1, 3, 3))[0, 0] - visible.float()
    assert (neighbours[visible] > 0).float().mean() > 0.8
    again = block_mask_2d(5, (14, 14), 0.8, 3, 0.07, inverse=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(m, again)  # reproducible from the generator
    assert (block_mask_2d(3, (8, 8), 0.5, 2, 0.0, inverse=False, generator=g).sum(1) == 32).all()


def test_beit_mask_is_exact_and_rectangular():
    g = torch.Generator().manual_seed(1)
    m = beit_mask_2d(4, (14, 14), 0.6, 16, g)
    assert (m.sum(1) == int(196 * 0.6)).all()
    grid = m[0].view(14, 14)
    rows = grid.any(1).nonzero().squeeze(1)
    assert len(rows) >= 4  # at least one rectangle of >= 16 patches spans several rows


def test_mask_settings_for_grids():
    s = MaskSettings("inverse_block", 0.75, 2, 0.0, clone_batch=3, grid=(4, 4))
    m = s(torch.tensor([16, 16]), 16, torch.Generator().manual_seed(0))
    assert m.shape == (6, 16) and (m.sum(1) == 12).all()
    with pytest.raises(ValueError, match="choose one of"):
        MaskSettings("span", 0.5, 2, grid=(4, 4))


# -- positions -------------------------------------------------------------------------
def test_sincos_2d_matches_hand_values():
    t = sincos_2d(8, 2, 3)  # (6, 8): columns in channels 0-3, rows in 4-7; w_k = 10000^(-k/2)
    row, col = 1, 2
    i = row * 3 + col
    expected = [torch.sin(torch.tensor(col * 1.0)), torch.sin(torch.tensor(col * 0.01)), torch.cos(torch.tensor(col * 1.0)),
                torch.cos(torch.tensor(col * 0.01)), torch.sin(torch.tensor(row * 1.0)), torch.sin(torch.tensor(row * 0.01)),
                torch.cos(torch.tensor(row * 1.0)), torch.cos(torch.tensor(row * 0.01))]
    assert torch.allclose(t[i], torch.stack(expected), atol=1e-6)
    table = sincos_2d(16, 4, 4)[None]
    assert torch.equal(resize_grid(table, (4, 4), (4, 4)), table)
    assert resize_grid(table, (4, 4), (6, 6)).shape == (1, 36, 16)


# -- data ------------------------------------------------------------------------------
def test_augmentation_shapes_and_ranges():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 40, 60)
    out = random_resized_crop(img, 32, (0.2, 1.0), g)
    assert out.shape == (3, 32, 32) and out.min() >= 0 and out.max() <= 1
    assert center_crop(img, 32).shape == (3, 32, 32)
    thin = torch.rand(3, 4, 200)  # no random crop of allowed ratio fits: falls back to a centre crop
    assert random_resized_crop(thin, 16, (0.9, 1.0), g).shape == (3, 16, 16)


def make_folder(root, classes=("a", "b"), per_class=6, size=16, splits=("train", "valid")):
    for split in splits:
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = (torch.rand(size, size, 3) * 255).to(torch.uint8).numpy()
                arr[..., c] = 255  # class = dominant channel
                Image.fromarray(arr).save(folder / f"{i}.png")


def test_modes_are_converted_to_rgb(tmp_path):
    Image.new("L", (8, 6), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (8, 6), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("CMYK", (8, 6), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    assert load_image(str(tmp_path / "gray.png"), "x").shape == (3, 6, 8)
    assert torch.allclose(load_image(str(tmp_path / "clear.png"), "x"), torch.ones(3, 6, 8))  # alpha over white
    assert load_image(str(tmp_path / "cmyk.jpg"), "x").shape == (3, 6, 8)


def test_bad_image_files_are_reported(tmp_path):
    make_folder(tmp_path / "img", per_class=3)
    good = tmp_path / "img" / "train" / "a" / "0.png"
    (tmp_path / "img" / "train" / "a" / "empty.png").write_bytes(b"")
    data = good.read_bytes()
    (tmp_path / "img" / "train" / "b" / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "img" / "train" / "b" / "text.jpg").write_text("not an image")
    counts = write_lists(str(tmp_path / "img"), str(tmp_path / "lists"), labelled=2)
    assert counts["train"] == 6 and counts["rejected"] == 3 and counts["classes"] == 2 and counts["labelled"] == 2
    rejected = (tmp_path / "lists" / "rejected.tsv").read_text()
    assert all(name in rejected for name in ("empty.png", "truncated.png", "text.jpg"))
    # a file broken after the lists were written fails at load, naming the file and list line
    good.write_bytes(data[:40])
    ds = ImageDataset(str(tmp_path / "lists" / "train.tsv"), 16, train=True)
    line = (tmp_path / "lists" / "train.tsv").read_text().splitlines().index("a/0.png\ta") + 1
    with pytest.raises(ImageDataError, match=rf"0.png \(.*train.tsv, line {line}\): cannot decode image"):
        ds[ds.files.index("a/0.png")]
    os.remove(good)
    with pytest.raises(ImageDataError, match="do not exist"):
        ImageDataset(str(tmp_path / "lists" / "train.tsv"), 16, train=True)


def test_dataset_batches_images_labels_and_masks(tmp_path):
    make_folder(tmp_path / "img")
    write_lists(str(tmp_path / "img"), str(tmp_path / "lists"))
    ds = ImageDataset(str(tmp_path / "lists" / "train.tsv"), 16, train=True, labels=["a", "b"])
    ds.set_masking(MaskSettings("inverse_block", 0.75, 2, 0.0, clone_batch=2, grid=(4, 4)))
    batch = ds.collater([ds[i] for i in range(3)])
    assert batch["net_input"]["source"].shape == (3, 3, 16, 16) and batch["target"].tolist() == [0, 0, 0]
    assert batch["net_input"]["mask"].shape == (6, 16)
    assert torch.equal(ds.collater([ds[i] for i in range(3)])["net_input"]["mask"], batch["net_input"]["mask"])
    with pytest.raises(ImageDataError, match="label outside labels.txt"):
        ImageDataset(str(tmp_path / "lists" / "train.tsv"), 16, train=True, labels=["a"])


# -- the model ---------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["v1", "v2"])
def test_image_model_trains_and_extracts(algorithm):
    from d2v_plugin.models.d2v_multi import D2vMultiModel

    extra = dict(image_mask_type="beit", image_mask_prob=0.6, image_mask_length=4) if algorithm == "v1" else {}
    model = D2vMultiModel(tiny_cfg(algorithm=algorithm, **{**IMAGE, **extra}))
    enc = model.modality_encoders["image"]
    assert ("patch_embed.proj.weight" in dict(model.teacher.modality_encoders["image"].named_parameters())) == (algorithm == "v2")
    out = model(torch.randn(2, 3, 16, 16))
    assert out["sample_size"] == int(out["masked_pct"] * 2 * model.cfg.clone_batch * 16 + 0.5)
    assert set(out["losses"]) == ({"regression", "cls"} if algorithm == "v2" else {"regression"})
    sum(out["losses"].values()).backward()
    assert enc.patch_embed.proj.weight.grad is not None and enc.positions.grad is None
    feats = model.eval().extract_features(torch.randn(2, 3, 24, 24))  # another resolution: positions resized
    assert feats["x"].shape == (2, 36, 32) and feats["extra"].shape == (2, 1, 32)


# -- the binaries --------------------------------------------------------------------------
@pytest.mark.slow
def test_pretrain_finetune_validate_with_fairseq_binaries(tmp_path):
    make_folder(tmp_path / "img", per_class=16, size=32)
    write_lists(str(tmp_path / "img"), str(tmp_path / "lists"), labelled=16)
    lists = tmp_path / "lists"
    small = ["model.depth=2", "model.embed_dim=32", "model.average_top_k_layers=2", "model.image_decoder_dim=16",
             "dataset.batch_size=8", "dataset.num_workers=0"]
    for algorithm in ("v1", "v2"):
        log = run([os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", os.path.join(REPO, "config/pretrain/image"),
                   "--config-name", f"tiny_{algorithm}", f"task.data={lists}", f"common.user_dir={user_dir()}",
                   f"checkpoint.save_dir={tmp_path / algorithm}", f"hydra.run.dir={tmp_path / ('hydra_' + algorithm)}",
                   "optimization.max_update=3", *(s for s in small if algorithm == "v2" or "decoder" not in s)])
        assert "done training" in log and "target_var" in log
    log = run([os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", os.path.join(REPO, "config/finetune/image"),
               "--config-name", "tiny", f"task.data={lists}", f"model.pretrained_path={tmp_path / 'v2' / 'checkpoint_last.pt'}",
               f"common.user_dir={user_dir()}", f"checkpoint.save_dir={tmp_path / 'ft'}", f"hydra.run.dir={tmp_path / 'hydra_ft'}",
               "optimization.max_update=3", "dataset.train_subset=labelled", "dataset.batch_size=8", "dataset.num_workers=0"])
    assert "| top1 " in log
    saved = torch.load(tmp_path / "ft" / "checkpoint_best.pt", weights_only=True)
    assert saved["cfg"]["model"]["pretrained_args"]["model"]["modalities"] == "image"
    out = subprocess.run([os.path.join(BIN, "fairseq-validate"), str(lists), "--user-dir", user_dir(), "--task",
                          "d2v_image_classification", "--path", str(tmp_path / "ft" / "checkpoint_best.pt"),
                          "--valid-subset", "valid", "--batch-size", "8", "--num-workers", "0"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "valid on 'valid' subset" in out.stdout + out.stderr and "| top1 " in out.stdout + out.stderr
    assert "nsentences 32" in out.stdout + out.stderr  # every validation image scored


IMAGE_CONFIGS = sorted(glob.glob(os.path.join(REPO, "config", "*", "image", "*.yaml")))


@pytest.mark.parametrize("path", IMAGE_CONFIGS, ids=lambda p: "/".join(p.split(os.sep)[-3:]))
def test_image_yaml_composes(path):
    from d2v_plugin.models.config import D2vMultiConfig
    from d2v_plugin.models.d2v_image_classifier import D2vImageClassifierConfig
    from d2v_plugin.models.d2v_multi import D2vMultiModel
    from d2v_plugin.tasks.image import D2vImageTaskConfig

    y = OmegaConf.load(path)
    assert OmegaConf.is_missing(y.task, "data") and OmegaConf.is_missing(y.common, "user_dir")
    values = {}
    for dc, section in ((D2vMultiConfig if "pretrain" in path else D2vImageClassifierConfig, "model"), (D2vImageTaskConfig, "task")):
        values[section] = OmegaConf.to_container(y[section])
        values[section].pop("_name")
        OmegaConf.merge(OmegaConf.structured(dc), values[section])  # unknown keys or wrong types raise
    if "pretrain" in path:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(D2vMultiConfig), values["model"]))
        assert cfg.image_input_size == y.task.input_size
        if "tiny" in path:
            assert D2vMultiModel(cfg).algorithm == cfg.algorithm


def test_mixup_and_cutmix_mix_images_and_targets_alike():
    import numpy as np

    from d2v_plugin.criterions.classification import D2vClassificationCriterion, D2vClassificationCriterionConfig

    class Task:
        labels = ["a", "b", "c"]

    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])  # row 0's partner is row 3 (label 1)
    np.random.seed(0)
    torch.manual_seed(0)
    mixed, soft = D2vClassificationCriterion(D2vClassificationCriterionConfig(mixup_alpha=0.8), Task()).mix(x, y)
    assert torch.allclose(soft.sum(1), torch.ones(4))
    lam = float(soft[0, 0])
    assert 0 < lam < 1 and torch.allclose(mixed[0], lam * x[0] + (1 - lam) * x[3])
    mixed, soft = D2vClassificationCriterion(D2vClassificationCriterionConfig(cutmix_alpha=1.0), Task()).mix(x, y)
    from_partner = (mixed[0] != x[0]).any(0).float().mean()  # fraction of pixels pasted from row 3
    assert float(soft[0, 1]) == pytest.approx(float(from_partner), abs=1e-6)
