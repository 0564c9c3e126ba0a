"""Classification train/validate: end to end on generated ImageFolders with a tiny VMamba.

Every run here is a few optimizer steps on 16x16 images, so the whole file stays fast on 2 cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.classification import train as train_mod
from tasks.classification import validate as validate_mod
from tasks.classification.checkpoint import RunFiles
from tasks.classification.data import ImageFolderError
from tasks.classification.model import UnknownModelError, build_model, checkpoint_info
from tasks.common.checkpoint import load_weights
from tasks.common.config import ConfigError
from tasks.common.csv_log import CsvLog
from tests.conftest import ROOT, fixture_path

TINY_MODEL = ["model.name=vmamba_t", "model.kwargs={depths: [1, 1], dims: 8}"]
CLASS_COLOURS = [(220, 40, 40), (40, 200, 60), (50, 60, 230)]


def make_image_folder(root: Path, n_train: int = 12, n_val: int = 5, size: int = 16, seed: int = 0) -> Path:
    """``root/{train,val}/c{i}/*.png``: each class a noisy tint of its own colour (learnable in a few steps)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, colour in enumerate(CLASS_COLOURS):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                noise = rng.integers(-60, 60, size=(size, size, 3))
                img = np.clip(np.array(colour)[None, None] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


def base_args(data: Path, out: Path, epochs: int = 2) -> list[str]:
    """A fast recipe: tiny model, 16x16 input, no heavy augmentation (each test adds what it checks)."""
    sets = TINY_MODEL + [
        "model.drop_path_rate=0.0", "data.img_size=16", "data.crop_pct=1.0", "data.num_workers=0",
        "aug.auto_augment=null", "aug.hflip=0.0", "aug.scale=[0.8, 1.0]", "aug.reprob=0.0",
        "aug.mixup=0.0", "aug.cutmix=0.0", "optim.lr=5e-3", "schedule.warmup_epochs=0",
        "ema.decay=0.9", "train.progress=false", "train.threads=1",
    ]
    args = ["--config", "digits", "--data-dir", str(data), "--output", str(out), "--epochs", str(epochs),
            "--batch-size", "6", "--set", "data.builtin=none"]
    for s in sets:
        args += ["--set", s]
    return args


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imgs"))


@pytest.fixture(scope="module")
def finished_run(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, train_mod.TrainSummary]:
    out = tmp_path_factory.mktemp("run") / "out"
    return out, train_mod.run(base_args(image_folder, out, epochs=2))


def test_end_to_end_loss_falls_and_writes_every_file(finished_run) -> None:
    out, summary = finished_run
    rows = CsvLog(out / "log.csv").rows()
    assert [r["epoch"] for r in rows] == [1.0, 2.0]
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    files = RunFiles(out)
    for path in (files.state, files.last, files.last_ema, files.best, files.curves, files.config):
        assert path.is_file(), path
    assert files.curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp")), "temporary files left behind"
    info = checkpoint_info(files.best)
    assert info["model"] == "vmamba_t" and info["class_names"] == ["c0", "c1", "c2"]
    assert summary.epochs_done == summary.total_epochs == 2


def test_validate_reproduces_the_logged_best_score(finished_run, image_folder: Path) -> None:
    out, summary = finished_run
    result = validate_mod.run(["--checkpoint", str(out / "best.safetensors"), "--data-dir", str(image_folder),
                               "--set", "train.progress=false", "--set", "data.num_workers=0",
                               "--set", "data.crop_pct=1.0"])
    assert result.count == 15
    assert result.top1 == pytest.approx(summary.best["top1"], abs=1e-9)
    assert result.loss == pytest.approx(summary.best["loss"], rel=1e-5)


def test_safetensors_weights_load_into_a_plain_timm_model(finished_run) -> None:
    out, _ = finished_run
    model = build_model("vmamba_t", 3, {"depths": [1, 1], "dims": 8}, checkpoint=out / "last.safetensors")
    saved = load_weights(out / "last.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


def test_init_checkpoint_with_other_classes_keeps_the_body_and_drops_the_head(finished_run) -> None:
    out, _ = finished_run
    model = build_model("vmamba_t", 5, {"depths": [1, 1], "dims": 8}, checkpoint=out / "last.safetensors")
    saved = load_weights(out / "last.safetensors")
    state = model.state_dict()
    assert state["head.fc.weight"].shape == (5, saved["head.fc.weight"].shape[1])
    assert all(torch.equal(state[k], v) for k, v in saved.items() if not k.startswith("head.fc."))


def test_bfloat16_autocast_and_gradient_checkpointing_on_cpu(image_folder: Path, tmp_path: Path) -> None:
    summary = train_mod.run(base_args(image_folder, tmp_path / "out", epochs=1) + [
        "--set", "train.precision=bfloat16", "--set", "model.grad_checkpointing=true"])
    assert summary.epochs_done == 1 and np.isfinite(summary.last["train_loss"])
    assert summary.last["val_top1"] >= 0
    # a finished run resumes to nothing and says so
    again = train_mod.run(base_args(image_folder, tmp_path / "out", epochs=1) + ["--resume"])
    assert again.epochs_done == 1 and again.last == {}


def test_resume_after_a_stop_gives_the_uninterrupted_weights(image_folder: Path, tmp_path: Path) -> None:
    # Everything random is on: RandAugment, Mixup/CutMix, random erasing, drop-path, EMA; one worker process.
    extra = ["--set", "aug.auto_augment=rand-m9-mstd0.5-inc1", "--set", "aug.mixup=0.8", "--set", "aug.cutmix=1.0",
             "--set", "aug.reprob=0.25", "--set", "model.drop_path_rate=0.1", "--set", "data.num_workers=1",
             "--set", "schedule.warmup_epochs=1"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    train_mod.run(base_args(image_folder, whole, epochs=3) + extra)
    first = train_mod.run(base_args(image_folder, split, epochs=3) + extra + ["--stop-after-epoch", "1"])
    assert first.epochs_done == 1
    with pytest.raises(train_mod.RunExistsError, match="--resume"):
        train_mod.run(base_args(image_folder, split, epochs=3) + extra)
    train_mod.run(base_args(image_folder, split, epochs=3) + extra + ["--resume"])
    for name in ("last.safetensors", "last_ema.safetensors", "best.safetensors"):
        a, b = load_weights(whole / name), load_weights(split / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    drop = {"epoch_seconds"}
    rows_a = [{k: v for k, v in r.items() if k not in drop} for r in CsvLog(whole / "log.csv").rows()]
    rows_b = [{k: v for k, v in r.items() if k not in drop} for r in CsvLog(split / "log.csv").rows()]
    assert rows_a == rows_b


def test_two_process_gloo_ddp_under_torchrun(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tasks.classification.train", *base_args(image_folder, out, epochs=1),
           "--set", "train.device=cpu", "--set", "train.batch_size=4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and "global batch 8" in proc.stdout
    rows = CsvLog(out / "log.csv").rows()
    assert len(rows) == 1  # written by rank 0 only
    # 15 validation images over 2 processes: the sampler pads to 16; the padded image must not be counted.
    single = validate_mod.run(["--checkpoint", str(out / "last.safetensors"), "--data-dir", str(image_folder),
                               "--set", "train.progress=false", "--set", "data.num_workers=0",
                               "--set", "data.crop_pct=1.0"])
    assert single.count == 15
    assert rows[0]["val_top1"] == pytest.approx(single.top1, abs=1e-9)
    assert rows[0]["val_loss"] == pytest.approx(single.loss, rel=1e-5)


def _official_vmamba_pth(tmp_path: Path) -> tuple[Path, dict]:
    """The official small VMamba of the fixtures, saved as a released checkpoint is: ``{"model": state_dict}``."""
    folder = fixture_path("vmamba_official", "parity_small")
    cfg = json.loads((folder / "config.json").read_text())
    path = tmp_path / "official.pth"
    torch.save({"model": torch.load(folder / "state_dict.pt")}, path)
    kw = cfg["constructor_kwargs"]
    return path, {"depths": kw["depths"], "dims": kw["dims"], "ssm_ratio": kw["ssm_ratio"],
                  "d_state": kw["ssm_d_state"]}


def _official_vim_pth(tmp_path: Path) -> tuple[Path, dict]:
    folder = fixture_path("vim_official", "parity_small")
    kw = json.loads((folder / "config.json").read_text())["constructor_kwargs"]
    path = tmp_path / "official_vim.pth"
    torch.save({"model": torch.load(folder / "state_dict.pt")}, path)
    return path, {"img_size": kw["img_size"], "patch_size": kw["patch_size"], "stride": kw["stride"],
                  "embed_dim": kw["embed_dim"], "depth": kw["depth"], "d_state": kw["d_state"]}


@pytest.mark.parametrize("family, model_name", [("vmamba_official", "vmamba_t"), ("vim_official", "vim_t")])
def test_official_pth_loads_through_timm_pretrained_path(family: str, model_name: str, tmp_path: Path) -> None:
    path, kwargs = (_official_vmamba_pth if family == "vmamba_official" else _official_vim_pth)(tmp_path)
    folder = fixture_path(family, "parity_small")
    model = build_model(model_name, 10, kwargs, checkpoint=path, checkpoint_classes=10).eval()
    with torch.no_grad():
        logits = model(torch.load(folder / "input.pt"))
    torch.testing.assert_close(logits, torch.load(folder / "logits.pt"), rtol=0, atol=1e-4)


def test_validate_official_pth_matches_a_direct_computation(tmp_path: Path) -> None:
    """Random images, labelled half by the official model's own prediction and half round-robin (so every class
    folder exists): validate must report the top-1 and cross-entropy computed here from the same weights."""
    from timm.data import create_transform

    path, kwargs = _official_vmamba_pth(tmp_path)
    model = build_model("vmamba_t", 10, kwargs, checkpoint=path, checkpoint_classes=10).eval()
    transform = create_transform(32, interpolation="bicubic", crop_pct=1.0)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(20)]
    with torch.no_grad():
        logits = model(torch.stack([transform(im) for im in images]))
    labels = torch.cat([logits[:10].argmax(1), torch.arange(10)])
    for i, (im, label) in enumerate(zip(images, labels.tolist())):
        (tmp_path / "val" / str(label)).mkdir(parents=True, exist_ok=True)
        im.save(tmp_path / "val" / str(label) / f"{i}.png")
    result = validate_mod.run([
        "--checkpoint", str(path), "--model", "vmamba_t", "--data-dir", str(tmp_path), "--img-size", "32",
        "--crop-pct", "1.0", "--batch-size", "8", "--set", f"model.kwargs={json.dumps(kwargs)}",
        "--set", "train.progress=false", "--set", "data.num_workers=0",
    ])
    assert result.count == 20
    assert result.top1 == pytest.approx(100 * (logits.argmax(1) == labels).double().mean().item())
    assert result.top1 >= 50
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1).double().mean().item()
    assert result.top5 == pytest.approx(100 * top5)
    assert result.loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-4)


# ------------------------------------------------------------------------------------------ bad input


def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(ImageFolderError, match=r"nowhere/train does not exist"):
        train_mod.run(base_args(tmp_path / "nowhere", tmp_path / "out"))


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "d", n_train=2, n_val=1)
    (data / "train" / "c9").mkdir()
    with pytest.raises(ImageFolderError, match=r"class folder .*train/c9 holds no image"):
        train_mod.run(base_args(data, tmp_path / "out"))


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "d", n_train=2, n_val=1)
    (data / "train" / "c1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(ImageFolderError, match=r"cannot read image file .*c1/broken\.png"):
        train_mod.run(base_args(data, tmp_path / "out"))


def test_unknown_model_name_is_named(image_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match=r"unknown model name 'vmamba_tiny_typo'"):
        train_mod.run(base_args(image_folder, tmp_path / "out") + ["--set", "model.name=vmamba_tiny_typo"])


def test_config_typo_is_named_with_a_suggestion(image_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.weight_decy'; did you mean "
                                          r"'optim\.weight_decay'"):
        train_mod.run(base_args(image_folder, tmp_path / "out") + ["--set", "optim.weight_decy=0.1"])
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text("optim:\n  lr: 1e-3\nschedul:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'schedul'; did you mean 'schedule'"):
        train_mod.run(["--config", str(bad_file)])


def test_too_few_images_for_one_batch_is_named(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "d", n_train=1, n_val=1)
    with pytest.raises(ImageFolderError, match=r"training set has 3 images, fewer than one batch of 6"):
        train_mod.run(base_args(data, tmp_path / "out"))


def test_validate_needs_a_model_name_for_a_foreign_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "foreign.pth"
    torch.save({"model": {}}, path)
    with pytest.raises(ConfigError, match="pass --model NAME"):
        validate_mod.run(["--checkpoint", str(path), "--data-dir", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="missing.pth does not exist"):
        validate_mod.run(["--checkpoint", str(tmp_path / "missing.pth"), "--model", "vmamba_t"])
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:40])
    with pytest.raises(SystemExit, match=r"^error: cannot read checkpoint .*truncated.pth: neither"):
        validate_mod.main(["--checkpoint", str(truncated), "--model", "vmamba_t", "--data-dir", str(tmp_path)])


def test_cli_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"^error: image folder .* does not exist"):
        train_mod.main(base_args(tmp_path / "nowhere", tmp_path / "out"))


def test_float16_on_cpu_is_refused(image_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="float16 needs CUDA"):
        train_mod.run(base_args(image_folder, tmp_path / "out") + ["--set", "train.precision=float16",
                                                                   "--set", "train.device=cpu"])


def test_help_lists_every_config_key(capsys: pytest.CaptureFixture) -> None:
    # (``python -m tasks.classification.train`` itself runs in the torchrun test)
    for module, keys in ((train_mod, ("--resume", "--stop-after-epoch")), (validate_mod, ("--checkpoint", "--crop-pct"))):
        with pytest.raises(SystemExit) as exit_info:
            module.build_parser().parse_args(["--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        for key in ("model.drop_path_rate", "aug.mixup", "optim.base_lr", "schedule.warmup_epochs", "ema.decay",
                    "train.precision", *keys):
            assert key in out
