"""The comparison command: config checks, growth fit, isolated measurement, and a tiny end-to-end run."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.compare import cli
from tasks.compare.config import ModelSource, ModelSpec, PassMode, SpeedConfig, Task, config_from_dict, load_config
from tasks.compare.growth import growth_exponent, token_count
from tasks.compare.models import build_model, check_models, size_kwargs
from tasks.compare.report import REPORT_FILES
from tasks.compare.speed import CellJob, measure_cell

TINY_SPEED = dict(resolutions=[32, 64], batch_size=2, num_classes=4, warmup=1, repeats=2, threads=1)


# ------------------------------------------------------------------------------------------ growth fit


def test_growth_exponent_recovers_power_laws() -> None:
    tokens = [token_count(r, 16, 2) for r in (224, 384, 512, 1024)]
    assert growth_exponent(tokens, [3.0 * t for t in tokens]) == pytest.approx(1.0)
    assert growth_exponent(tokens, [0.5 * t**2 for t in tokens]) == pytest.approx(2.0)
    # n/a cells are left out of the fit; fewer than two points leaves nothing to fit
    assert growth_exponent(tokens, [t**1.5 if i != 1 else None for i, t in enumerate(tokens)]) == pytest.approx(1.5)
    assert growth_exponent(tokens, [None, None, 5.0, None]) is None
    assert token_count(64, 16, 3) == 64.0


# ------------------------------------------------------------------------------------------- config


def test_shipped_configs_load() -> None:
    for name in ("classification", "segmentation", "tiny"):
        cfg = load_config(name)
        assert cfg.models, name
    assert load_config("classification").speed.resolutions == [224, 384, 512, 1024]


def test_unknown_config_key_is_named() -> None:
    with pytest.raises(ValueError, match=r"speed\.resolution'.*did you mean 'speed\.resolutions'"):
        config_from_dict({"models": [{"name": "convnext_atto"}], "speed": {"resolution": [32]}})
    with pytest.raises(ValueError, match=r"models\[0\]\.nmae"):
        config_from_dict({"models": [{"nmae": "convnext_atto"}]})
    with pytest.raises(ValueError, match=r"speed\.repeats"):
        load_config("tiny", ["speed.repeats=many"])
    with pytest.raises(ValueError, match=r"speed\.batch_size must be >= 1"):
        load_config("tiny", ["speed.batch_size=0"])
    with pytest.raises(ValueError, match=r"duplicate label"):
        config_from_dict({"models": [{"name": "convnext_atto"}, {"name": "convnext_atto"}]})
    with pytest.raises(ValueError, match=r"neither a file nor one of configs/compare"):
        load_config("no_such_config")


def test_cli_reports_bad_config_key(capsys, tmp_path: Path) -> None:
    assert cli.main(["--config", "tiny", "--out", str(tmp_path), "speed.warmupp=2"]) == 2
    err = capsys.readouterr().err
    assert "speed.warmupp" in err and "speed.warmup" in err
    # a typo in the training budget fails before any measurement, naming the recipe's key
    assert cli.main(["--config", "tiny", "--out", str(tmp_path / "o"), "accuracy.overrides={schedule.epochz: 1}"]) == 2
    err = capsys.readouterr().err
    assert "schedule.epochz" in err and "schedule.epochs" in err
    assert cli.main(["--config", "tiny", "--out", str(tmp_path / "o"), "accuracy.recipe=no_such_recipe"]) == 2
    assert "accuracy.recipe" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------- models


def test_unknown_model_name_is_a_clear_error(capsys, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown model 'convnext_atoo'.*convnext_atto"):
        check_models([ModelSpec("convnext_atto"), ModelSpec("convnext_atoo")], Task.CLASSIFICATION)
    with pytest.raises(ValueError, match=r"unknown model 'SwinUNETRR' \(source monai\).*SwinUNETR"):
        check_models([ModelSpec("SwinUNETRR", source=ModelSource.MONAI)], Task.SEGMENTATION)
    # the command stops before measuring anything
    assert cli.main(["--config", "tiny", "--out", str(tmp_path / "o"), "--models", "convnext_atto,vit_tinny"]) == 2
    assert "unknown model 'vit_tinny'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_img_size_only_for_models_that_take_it() -> None:
    assert size_kwargs(ModelSpec("deit_tiny_patch16_224"), Task.CLASSIFICATION, 64) == {"img_size": 64}
    assert size_kwargs(ModelSpec("convnext_atto"), Task.CLASSIFICATION, 64) == {}
    assert size_kwargs(ModelSpec("UNETR"), Task.SEGMENTATION, 32, 3) == {"img_size": (32, 32, 32)}
    assert size_kwargs(ModelSpec("SwinUNETR"), Task.SEGMENTATION, 32, 3) == {}
    model = build_model(ModelSpec("deit_tiny_patch16_224", kwargs={"depth": 1}), Task.CLASSIFICATION,
                        resolution=48, in_chans=3, num_classes=4)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 4)


# ---------------------------------------------------------------------------------- one measured cell


def _job(spec: ModelSpec, resolution: int, task: Task = Task.CLASSIFICATION, **speed) -> CellJob:
    return CellJob(spec, task, resolution, SpeedConfig(**{**TINY_SPEED, **speed}))


def test_measure_cell_numbers_and_json_round_trip() -> None:
    job = _job(ModelSpec("deit_tiny_patch16_224", kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}), 32)
    assert CellJob.from_json(job.to_json()) == job
    result = measure_cell(job)
    assert result.ok, result.reason
    assert len(result.step_seconds) == 2 and result.images_per_second > 0
    assert result.params == sum(p.numel() for p in build_model(
        job.spec, job.task, resolution=32, in_chans=3, num_classes=4).parameters())
    # FLOPs: at least the patch embedding and the head, and finite
    assert math.isfinite(result.flops) and result.flops > 2 * 32 * 3 * 16 * 16 * 4
    assert result.peak_memory_bytes is not None and result.peak_memory_bytes >= 0


def test_model_that_cannot_take_a_size_is_na_with_reason() -> None:
    # without img_size= a 224-sized ViT refuses 32x32 inputs: reported, not raised
    result = measure_cell(_job(ModelSpec("deit_tiny_patch16_224", kwargs={"depth": 1}), 32, pass_img_size=False))
    assert not result.ok
    assert "fails at 32" in result.reason and "224" in result.reason
    assert result.step_seconds == [] and result.peak_memory_bytes is None


def test_segmentation_cell_builds_3d_monai_model() -> None:
    spec = ModelSpec("UNETR", kwargs={"feature_size": 4, "hidden_size": 24, "mlp_dim": 48, "num_heads": 2})
    result = measure_cell(_job(spec, 16, Task.SEGMENTATION, in_chans=1, num_classes=3, spatial_dims=3,
                               batch_size=1, mode=PassMode.FORWARD_BACKWARD))
    assert result.ok, result.reason
    assert result.flops > 0 and result.images_per_second > 0


# ----------------------------------------------------------------------------------------- end to end


def _write_imagefolder(root: Path) -> Path:
    """Two classes told apart by brightness: 6 training and 2 validation PNGs each."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for cls, level in (("dark", 40), ("light", 210)):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(level + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def _finite(text: str) -> bool:
    return text != "" and math.isfinite(float(text))


def test_end_to_end_tiny_run_writes_every_file(tmp_path: Path, capsys) -> None:
    data = _write_imagefolder(tmp_path / "data")
    out = tmp_path / "out"
    assert cli.main(["--config", "tiny", "--out", str(out), f"accuracy.data={data}"]) == 0
    for name in REPORT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in ("throughput.png", "memory.png", "accuracy_vs_flops.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with open(out / "summary.csv") as handle:
        summary = list(csv.DictReader(handle))
    cfg = load_config(out / "config.yaml")
    assert [row["model"] for row in summary] == [m.display for m in cfg.models]
    assert len(summary) == 2
    for row in summary:
        for key in ("params_m", "gmacs_at_32", "images_per_s_at_32", "images_per_s_at_64", "peak_mem_mb_at_32",
                    "peak_mem_mb_at_64", "time_exponent", "memory_exponent", "flops_exponent", "top1", "top5",
                    "train_seconds"):
            assert _finite(row[key]), (row["model"], key, row[key])
        assert float(row["params_m"]) > 0 and float(row["gmacs_at_32"]) > 0
        assert 0 <= float(row["top1"]) <= 100
        # FLOPs of these models grow about linearly with the token count (4x tokens from 32 to 64)
        assert 0.7 < float(row["flops_exponent"]) < 1.5, row

    with open(out / "measurements.csv") as handle:
        cells = list(csv.DictReader(handle))
    assert len(cells) == 4 and all(c["status"] == "ok" for c in cells)
    assert all(float(c["images_per_s"]) > 0 for c in cells)

    env = json.loads((out / "environment.json").read_text())
    for key in ("date", "cpu", "logical_cpus", "threads_per_measurement", "versions", "settings", "memory_method"):
        assert env[key] not in (None, "", []), key
    from vmamba.ops.fused import FusedKernel

    assert set(env["scan_kernels"]) == {kernel.value for kernel in FusedKernel}
    assert all(path.startswith(("fused", "pure PyTorch")) for path in env["scan_kernels"].values())
    assert env["versions"]["torch"] == torch.__version__.split("+")[0] or env["versions"]["torch"]
    text = (out / "results.md").read_text()
    assert "Top-1 (%)" in text and "GMACs @32" in text and "n/a" not in text.split("Not available")[0]
    assert "| convnext_atto |" in capsys.readouterr().out


def test_timeout_skips_larger_sizes_and_report_says_why(tmp_path: Path, monkeypatch) -> None:
    """A child that times out at one size is not retried at larger ones; the report shows n/a and the reason."""
    from tasks.compare import runner
    from tasks.compare.accuracy import AccuracyResult
    from tasks.compare.report import write_report
    from tasks.compare.speed import CellResult

    calls = []

    def fake_run_cell(job: CellJob) -> CellResult:
        calls.append((job.spec.name, job.resolution))
        if job.spec.name == "slow" and job.resolution >= 64:
            return CellResult(job.spec.display, job.resolution, job.trial, ok=False,
                              reason=f"timed out after 1 s at {job.resolution}")
        return CellResult(job.spec.display, job.resolution, job.trial, ok=True, params=1000, flops=2e9 * job.resolution,
                          step_seconds=[0.01 * job.resolution, 0.02 * job.resolution], batch_size=1,
                          peak_memory_bytes=2**20 * job.resolution, memory_method="test")

    monkeypatch.setattr(runner, "run_cell", fake_run_cell)
    cfg = config_from_dict({"models": [{"name": "fast"}, {"name": "slow"}], "output": str(tmp_path),
                            "speed": {"resolutions": [32, 64, 128]}, "accuracy": {"enabled": False}})
    cells = runner.measure_speed(cfg, progress=lambda _: None)
    assert calls == [("fast", 32), ("fast", 64), ("fast", 128), ("slow", 32), ("slow", 64)]
    models = runner.summarise(cfg, cells, {"fast": AccuracyResult("fast", ok=True, metrics={"top1": 50.0},
                                                                  train_seconds=1.0)})
    fast, slow = models
    assert fast.time_exponent == pytest.approx(0.5)  # step time ~ resolution = tokens ** 0.5
    assert fast.flops_exponent == pytest.approx(0.5) and fast.memory_exponent == pytest.approx(0.5)
    assert fast.cell(64).images_per_second == pytest.approx(1 / 0.96)  # batch / median step
    assert [c.ok for c in slow.cells] == [True, False, False]
    assert slow.cell(128).reason == "skipped: timed out after 1 s at 64"
    assert slow.time_exponent is None
    write_report(runner.CompareResult(config=cfg, models=models, raw_cells=cells), tmp_path)
    text = (tmp_path / "results.md").read_text()
    assert "- slow @ 64: n/a, timed out after 1 s at 64" in text
    assert "- slow accuracy" not in text and "| slow | 0.001 | 32 |" in text
    assert "| fast | 0.001 | 32 | 50 | 1 | 0.5 | 0.5 | 0.5 |" in text  # top-1, train s, exponents
    assert not (tmp_path / "accuracy_vs_flops.png").exists()  # accuracy was off


def test_cpu_attention_flops_are_counted() -> None:
    """timm's attention runs PyTorch's CPU flash kernel; its FLOPs must count (2 bmm of 2*L*L*D per head)."""
    from torch.utils.flop_counter import FlopCounterMode

    from tasks.compare.models import register_our_models

    register_our_models()
    q = torch.randn(2, 3, 50, 8, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == 2 * (2 * 2 * 3 * 50 * 50 * 8)
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    assert counter.get_total_flops() > 0


def _write_decathlon(root: Path, cases: int = 3, size: int = 32) -> Path:
    """Synthetic spheres (labels 0, 1, 2) as NIfTI in the Decathlon layout: 2 training, 1 validation case."""
    import nibabel as nib
    from monai.data import create_test_image_3d

    entries = []
    for i in range(cases):
        image, seg = create_test_image_3d(size, size, size, num_objs=4, rad_max=8, rad_min=4, noise_max=0.2,
                                          num_seg_classes=2, random_state=np.random.RandomState(i))
        for folder, array, dtype in (("imagesTr", image, np.float32), ("labelsTr", seg, np.uint8)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array.astype(dtype), np.eye(4)), root / folder / f"case{i}.nii.gz")
        entries.append({"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"})
    data = {"name": "spheres", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "dim", "2": "bright"},
            "training": entries[:-1], "validation": entries[-1:]}
    (root / "dataset.json").write_text(json.dumps(data))
    return root


def test_segmentation_accuracy_for_ours_and_monai(tmp_path: Path) -> None:
    """Dice and HD95 for our VMambaUNet (through the recipe) and MONAI's UNETR (handed to the job) alike."""
    data = _write_decathlon(tmp_path / "data")
    out = tmp_path / "out"
    cfg = config_from_dict({
        "task": "segmentation",
        "models": [
            {"name": "VMambaUNet", "label": "ours", "kwargs": {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64],
                                                               "feature_size": 8}},
            {"name": "UNETR", "label": "unetr", "kwargs": {"feature_size": 8, "hidden_size": 32, "mlp_dim": 64,
                                                           "num_heads": 2}},
        ],
        "speed": {"enabled": False, "resolutions": [32], "in_chans": 1, "num_classes": 3, "spatial_dims": 3},
        "accuracy": {"recipe": "mni152_tissue", "data": str(data), "overrides": {
            "transforms.roi_size": [32, 32, 32], "transforms.num_samples": 1, "train.epochs": 1,
            "train.val_every": 1, "optim.warmup_epochs": 0, "eval.sw_batch_size": 1}},
        "output": str(out),
    })
    from tasks.compare.runner import run_compare

    result = run_compare(cfg, progress=lambda _: None)
    for model in result.models:
        assert model.accuracy.ok, model.accuracy.reason
        metrics = model.accuracy.metrics
        assert 0 <= metrics["dice"] <= 1 and math.isfinite(metrics["hd95"])
        assert {"dice_dim", "dice_bright"} <= set(metrics)
        assert model.params > 0
    with open(out / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["model"] for r in rows] == ["ours", "unetr"] and all(_finite(r["dice"]) for r in rows)
    assert "Mean Dice" in (out / "results.md").read_text()
    assert (out / "accuracy_vs_flops.png").is_file() and not (out / "throughput.png").exists()
