"""Segmentation jobs (tasks.segmentation) on small generated data: MONAI's synthetic spheres written as NIfTI
in a Decathlon folder, with a non-RAS, non-isotropic affine so that orientation, spacing and their inversion
are exercised.

One 2-epoch 3-D training run (module fixture) serves several tests: its validation Dice rises, its files
exist, a run stopped after epoch 1 and resumed ends with identical weights, ``predict`` writes label maps in
the inputs' geometry and ``evaluate`` scores it. Bad input gets errors that name the file or field.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import create_test_image_3d

from tasks.common.checkpoint import load_weights
from tasks.common.config import ConfigError, load_config
from tasks.segmentation.config import SegmentationConfig, resolve_config_path
from tasks.segmentation.data import DatasetError, check_cases, load_cases, read_dataset_json, split_cases
from tasks.segmentation.engine import MetricTotals, case_metrics
from tasks.segmentation.evaluate import evaluate
from tasks.segmentation.predict import predict
from tasks.segmentation.train import RunExistsError, prepare_data, train
from tasks.common.distributed import DistContext

ROOT = Path(__file__).resolve().parents[1]
# LPS-like axes (RAS needs two flips), 1.5 x 1.5 x 2.5 mm voxels, an offset origin
AFFINE = np.array([[-1.5, 0, 0, 30.0], [0, -1.5, 0, 20.0], [0, 0, 2.5, -10.0], [0, 0, 0, 1]])
SIZE = (40, 36, 26)


def _write_case(root: Path, name: str, seed: int, channels: int = 1, label_shape: tuple[int, ...] | None = None) -> dict:
    image, seg = create_test_image_3d(*SIZE, num_objs=5, rad_max=7, rad_min=4, noise_max=0.2, num_seg_classes=2,
                                      random_state=np.random.RandomState(seed))
    if channels > 1:
        image = np.stack([image] * channels, axis=-1)
    if label_shape is not None:
        seg = np.zeros(label_shape, dtype=seg.dtype)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image.astype(np.float32), AFFINE), root / "imagesTr" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(seg.astype(np.uint8), AFFINE), root / "labelsTr" / f"{name}.nii.gz")
    return {"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"}


def make_decathlon(root: Path, n: int = 6, **fields) -> Path:
    cases = [_write_case(root, f"case_{i:02d}", seed=i) for i in range(n)]
    data = {"name": "Spheres", "modality": {"0": "synthetic"}, "labels": {"0": "background", "1": "dim", "2": "bright"},
            "training": cases, "test": [c["image"] for c in cases[-1:]], **fields}
    (root / "dataset.json").write_text(json.dumps(data))
    return root / "dataset.json"


def tiny_config(root: Path, output: Path, *overrides: str) -> SegmentationConfig:
    base = [
        f"data.root={root}", f"train.output_dir={output}", "data.val_count=2",
        "model.spatial_dims=3", "model.in_channels=1", "model.out_channels=3", "model.depths=[1, 1, 1, 1]",
        "model.dims=[8, 16, 16, 16]", "model.feature_size=6",
        "transforms.modality=ct", "transforms.a_min=0", "transforms.a_max=1", "transforms.pixdim=[2.0, 2.0, 2.0]",
        "transforms.roi_size=[64, 64, 32]", "transforms.num_samples=2", "transforms.flip_prob=0.2",
        "transforms.rot90_prob=0.2",
        "optim.lr=0.01", "optim.warmup_epochs=0", "train.epochs=2", "train.val_every=1", "train.progress=false",
        "train.device=cpu", "eval.sw_batch_size=2", "eval.overlap=0.25",
    ]
    return load_config(SegmentationConfig, None, base + list(overrides))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("spheres")
    make_decathlon(root)
    return root


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    output = tmp_path_factory.mktemp("run") / "full"
    summary = train(tiny_config(data_root, output))
    return summary


# ---------------------------------------------------------------------------------------------- training


def test_two_epoch_training_raises_validation_dice_and_writes_its_files(trained) -> None:
    rows = [json.loads(json.dumps(r)) for r in _log_rows(trained.output_dir)]
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    first, second = rows[0]["val_mean_dice"], rows[1]["val_mean_dice"]
    assert second > first, f"validation Dice did not rise: {first:.3f} -> {second:.3f}"
    for name in ("best.safetensors", "last.safetensors", "last_state.pt", "log.csv", "curves.png", "overlay.png",
                 "metrics.json", "config.yaml"):
        assert (trained.output_dir / name).is_file(), name
    assert trained.best["epoch"] == 2 and trained.class_names == ["background", "dim", "bright"]
    assert {"val_dice_dim", "val_dice_bright", "val_hd95_dim", "val_hd95_bright"} <= set(rows[1])


def _log_rows(output: Path) -> list[dict]:
    from tasks.common.csv_log import CsvLog

    return CsvLog(output / "log.csv").rows()


def test_resume_equals_uninterrupted(trained, data_root, tmp_path) -> None:
    cfg = tiny_config(data_root, tmp_path / "split")
    train(cfg, stop_after_epoch=1)
    with pytest.raises(RunExistsError, match="--resume"):
        train(cfg)
    train(cfg, resume=True)
    full, split = load_weights(trained.output_dir / "last.safetensors"), load_weights(tmp_path / "split" / "last.safetensors")
    assert full.keys() == split.keys()
    for key in full:
        assert torch.equal(full[key], split[key]), key
    full_rows, split_rows = _log_rows(trained.output_dir), _log_rows(tmp_path / "split")
    assert [r["train_loss"] for r in full_rows] == [r["train_loss"] for r in split_rows]


def test_two_d_slice_pipeline_trains_and_validates(data_root, tmp_path) -> None:
    cfg = tiny_config(data_root, tmp_path / "run2d", "model.spatial_dims=2", "transforms.roi_size=[32, 32]",
                      "transforms.modality=mri", "slices.slices_per_volume=4", "train.batch_size=4", "train.epochs=1",
                      "eval.hd95=false")
    summary = train(cfg)
    assert summary.best is not None and 0 <= summary.best["mean_dice"] <= 1
    assert (tmp_path / "run2d" / "overlay.png").is_file()


def test_slice_dataset_items_are_reproducible(data_root) -> None:
    from monai.data import Dataset

    from tasks.segmentation.transforms import SliceDataset, val_transforms

    cfg = tiny_config(data_root, data_root / "unused", "model.spatial_dims=2", "transforms.roi_size=[24, 32]")
    volumes = Dataset(load_cases(data_root / "dataset.json", "training")[:2], val_transforms(cfg))
    slices = SliceDataset(volumes, cfg, seed=3)
    first = slices[5]
    assert first["image"].shape == (1, 24, 32) and first["label"].shape == (1, 24, 32)
    torch.testing.assert_close(slices[5]["image"], first["image"])
    slices.set_epoch(1)
    assert not torch.equal(slices[5]["image"], first["image"])


# ------------------------------------------------------------------------------- predict and evaluate


def test_predict_writes_label_maps_in_the_input_geometry(trained, data_root, tmp_path, monkeypatch) -> None:
    from tasks.segmentation import predict as predict_module
    from tasks.segmentation.engine import config_from_checkpoint
    from tasks.segmentation.transforms import val_transforms

    checkpoint = trained.output_dir / "best.safetensors"
    cfg, names = config_from_checkpoint(checkpoint)
    # another shape, spacing and a permuted orientation than the training data
    affine = np.array([[0, 0, 1.2, -5.0], [1.7, 0, 0, 3.0], [0, -1.1, 0, 8.0], [0, 0, 0, 1]])
    image, seg = create_test_image_3d(23, 30, 19, num_objs=3, rad_max=8, rad_min=5, num_seg_classes=2,
                                      random_state=np.random.RandomState(9))
    odd, odd_label = tmp_path / "odd.nii.gz", tmp_path / "odd_label.nii.gz"
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), odd)
    nib.save(nib.Nifti1Image(seg.astype(np.uint8), affine), odd_label)
    inputs = [data_root / "imagesTr" / "case_05.nii.gz", odd]
    labels = [data_root / "labelsTr" / "case_05.nii.gz", odd_label]

    written = predict(cfg, checkpoint, inputs, tmp_path / "pred", names, overlay=True)
    assert [p.name for p in written] == ["case_05_seg.nii.gz", "odd_seg.nii.gz"]
    for source, out in zip(inputs, written):
        src, pred = nib.load(source), nib.load(out)
        assert pred.shape == src.shape
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-6)
        values = np.unique(np.asarray(pred.dataobj))
        assert set(values.tolist()) <= {0, 1, 2} and pred.get_data_dtype() == np.uint8
    assert (tmp_path / "pred" / "odd_seg.png").is_file()

    # Geometry of the content, independent of how well the tiny model learnt: an oracle network that
    # returns the (pre-processed) truth must come back as the original label maps, voxel for voxel but for
    # the blur of resampling there and back (a mirrored or transposed result scores about 0.2 here).
    truths = iter([val_transforms(cfg)({"image": str(i), "label": str(l)})["label"] for i, l in zip(inputs, labels)])

    def oracle(model, image, cfg):
        truth = next(truths).as_tensor().long()[0]
        assert truth.shape == image.shape[2:]
        return 10.0 * torch.nn.functional.one_hot(truth, 3).movedim(-1, 0)[None].float()

    monkeypatch.setattr(predict_module, "infer", oracle)
    written = predict(cfg, checkpoint, inputs, tmp_path / "oracle", names)
    for label, out in zip(labels, written):
        truth, pred = np.asarray(nib.load(label).dataobj), np.asarray(nib.load(out).dataobj)
        fg = (truth > 0) | (pred > 0)
        assert (pred[fg] == truth[fg]).mean() > 0.8, out.name


def test_evaluate_scores_the_validation_hold_out(trained, tmp_path) -> None:
    from tasks.segmentation.engine import config_from_checkpoint

    checkpoint = trained.output_dir / "best.safetensors"
    cfg, names = config_from_checkpoint(checkpoint, overrides=["eval.regions={tumour: [1, 2]}"])
    result = evaluate(cfg, checkpoint, names, "validation", tmp_path / "eval")
    assert len(result.cases) == 2 and [c.name for c in result.cases] == ["case_04", "case_05"]
    assert abs(result.means["mean_dice"] - trained.best["mean_dice"]) < 1e-6
    assert 0 <= result.means["dice_tumour"] <= 1
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["cases"] == 2 and (tmp_path / "eval" / "evaluation.csv").is_file()


def test_commands_have_help() -> None:
    out = subprocess.run([sys.executable, "-m", "tasks.segmentation.train", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "usage: vmamba-seg-train" in out.stdout and "transforms.roi_size" in out.stdout
    from tasks.segmentation import evaluate as evaluate_cli, predict as predict_cli

    assert "--checkpoint" in evaluate_cli.build_parser().format_help()
    assert "--overlay" in predict_cli.build_parser().format_help()


# ---------------------------------------------------------------------------------------------- metrics


def test_case_metrics_against_hand_counts() -> None:
    label = torch.zeros(1, 10, 10, 10, dtype=torch.long)
    label[0, 2:6, 2:6, 2:6] = 1  # 64 voxels
    pred = torch.zeros_like(label)
    pred[0, 2:6, 2:6, 2:4] = 1  # 32 of them
    pred[0, 8, 8, 8] = 2  # a class absent from the truth
    m = case_metrics("c", pred, label, num_classes=3, spacing=(1.0, 1.0, 1.0), hd95=True, regions={"any": [1, 2]})
    assert m.dice[0] == pytest.approx(2 * 32 / (64 + 32))
    assert np.isnan(m.dice[1])  # no truth: undefined, not averaged
    assert m.hd95[0] == pytest.approx(2.0)  # the missing half lies 1-2 voxels from the predicted surface
    assert m.region_dice["any"] == pytest.approx(2 * 32 / (64 + 33))
    means = MetricTotals.from_cases([m, m], ["a", "b"], ["any"]).means()
    assert means["mean_dice"] == pytest.approx(m.dice[0]) and np.isnan(means["dice_b"])


# -------------------------------------------------------------------------------------------- bad input


def _ctx() -> DistContext:
    return DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_missing_file_is_named(tmp_path) -> None:
    make_decathlon(tmp_path, n=3)
    (tmp_path / "labelsTr" / "case_01.nii.gz").unlink()
    cfg = tiny_config(tmp_path, tmp_path / "out", "data.val_count=1")
    with pytest.raises(FileNotFoundError, match=r"training\[1\]\.label: file .*case_01\.nii\.gz does not exist"):
        prepare_data(cfg, _ctx())


def test_image_label_shape_mismatch_is_named(tmp_path) -> None:
    manifest = make_decathlon(tmp_path, n=2)
    _write_case(tmp_path, "case_01", seed=1, label_shape=(40, 36, 25))
    cases = load_cases(manifest, "training")
    with pytest.raises(DatasetError, match=r"training\[1\]: image .*case_01\.nii\.gz has spatial shape \(40, 36, 26\) "
                                           r"but label .*case_01\.nii\.gz has \(40, 36, 25\)"):
        check_cases(cases, in_channels=1)


def test_wrong_channel_count_is_named(tmp_path) -> None:
    manifest = make_decathlon(tmp_path, n=2)
    _write_case(tmp_path, "case_00", seed=0, channels=4)
    with pytest.raises(DatasetError, match=r"training\[0\]\.image: .*case_00\.nii\.gz has 4 channel\(s\).*"
                                           r"model\.in_channels=1"):
        check_cases(load_cases(manifest, "training"), in_channels=1)
    cfg = tiny_config(tmp_path, tmp_path / "out", "model.in_channels=4", "data.val_count=1")
    with pytest.raises(ConfigError, match="lists 1 modalities .* model.in_channels is 4"):
        prepare_data(cfg, _ctx())


@pytest.mark.parametrize("content, match", [
    ("{not json", r"dataset\.json is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    (json.dumps({"labels": {"0": "bg"}}), r"field 'training' is missing"),
    (json.dumps({"training": [{"image": "a.nii.gz"}]}), r"training\[0\] has no 'label' field"),
    (json.dumps({"training": ["a.nii.gz"]}), r"training\[0\] must be an object"),
    (json.dumps({"training": [], "labels": {}}), r"field 'training' must be a non-empty list"),
    (json.dumps({"training": [{"image": "a", "label": "b"}], "labels": {"0": "bg", "2": "x"}}),
     "number the classes 0..N-1"),
    (json.dumps({"training": [{"image": ["a", "b"], "label": "c"}]}), r"training\[0\]\.image must be one file path"),
])
def test_malformed_dataset_json_names_the_field(tmp_path, content: str, match: str) -> None:
    (tmp_path / "dataset.json").write_text(content)
    with pytest.raises(DatasetError, match=match):
        load_cases(tmp_path / "dataset.json", "training")


def test_missing_dataset_json_and_label_count_mismatch(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"dataset file .*dataset\.json does not exist"):
        read_dataset_json(tmp_path / "dataset.json")
    make_decathlon(tmp_path, n=3)
    cfg = tiny_config(tmp_path, tmp_path / "out", "model.out_channels=2")
    with pytest.raises(ConfigError, match=r"lists 3 labels .* model\.out_channels is 2"):
        prepare_data(cfg, _ctx())


def test_evaluate_and_predict_name_an_unreadable_checkpoint(tmp_path) -> None:
    """A truncated weights file ends the command line with one line naming it (no traceback)."""
    from tasks.segmentation import evaluate as evaluate_module, predict as predict_module

    cut = tmp_path / "best.safetensors"
    cut.write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00{")  # a header length, then a cut-off header
    with pytest.raises(SystemExit, match=r"^error: cannot read checkpoint .*best\.safetensors: not a whole"):
        evaluate_module.main(["--checkpoint", str(cut)])
    with pytest.raises(SystemExit, match=r"^error: cannot read checkpoint .*best\.safetensors: not a whole"):
        predict_module.main(["--checkpoint", str(cut), "--input", str(tmp_path), "--output", str(tmp_path / "out")])


def test_hold_out_split_and_its_errors(tmp_path) -> None:
    manifest = make_decathlon(tmp_path, n=3)
    info, data = read_dataset_json(manifest)
    train_cases, val_cases = split_cases(info, data, "training", "validation", None, 0.2)
    assert [c["name"] for c in val_cases] == ["case_02"] and len(train_cases) == 2
    with pytest.raises(DatasetError, match="cannot hold out 3 validation case"):
        split_cases(info, data, "training", "validation", 3, 0.2)


def test_config_cross_checks() -> None:
    with pytest.raises(ConfigError, match="transforms.roi_size needs 2 values"):
        load_config(SegmentationConfig, None, ["model.spatial_dims=2", "transforms.roi_size=[96, 96, 96]"]).check()
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        load_config(SegmentationConfig, None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"eval.regions.WT must be a list of foreground labels in 1..1"):
        load_config(SegmentationConfig, None, ["eval.regions={WT: [1, 2]}"]).check()


@pytest.mark.parametrize("recipe", ["mni152_tissue", "spleen", "btcv", "brain_tumour"])
def test_recipes_load_and_check(recipe: str) -> None:
    cfg = load_config(SegmentationConfig, resolve_config_path(recipe))
    cfg.check()


def test_config_starts_a_2d_encoder_from_a_vmamba_checkpoint(tmp_path) -> None:
    from backbones.vmamba import VSSM
    from tasks.segmentation.engine import build_model

    source = VSSM(in_chans=3, num_classes=5, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), ssm_ratio=1.0, d_state=1)
    torch.save({"model": source.state_dict()}, tmp_path / "vmamba.pth")
    cfg = load_config(SegmentationConfig, None, [
        "model.spatial_dims=2", "model.in_channels=3", "model.dims=[8, 16, 16, 16]", "model.depths=[1, 1, 1, 1]",
        f"model.encoder_checkpoint={tmp_path / 'vmamba.pth'}", "transforms.roi_size=[64, 64]"])
    cfg.check()
    model = build_model(cfg.model)
    for key, value in source.state_dict().items():
        if key.startswith(("stem.", "stages.")):
            torch.testing.assert_close(model.encoder.state_dict()[key], value, msg=key)
    with pytest.raises(ConfigError, match="needs model.spatial_dims=2"):
        load_config(SegmentationConfig, None, ["model.encoder_checkpoint=x.pth"]).check()


def test_another_network_trains_with_the_same_recipe(data_root, tmp_path) -> None:
    from monai.networks.nets import UNet

    from tasks.segmentation.engine import config_from_checkpoint

    net = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,))
    summary = train(tiny_config(data_root, tmp_path / "unet", "train.epochs=1", "eval.hd95=false"), network=net)
    assert summary.best is not None and summary.last["epoch"] == 1
    with pytest.raises(ValueError, match="holds a UNet; evaluate / predict rebuild VMambaUNet only"):
        config_from_checkpoint(tmp_path / "unet" / "best.safetensors")


def test_ddp_under_torchrun_shards_and_reduces(data_root, tmp_path) -> None:
    from tasks.common.config import save_config
    from tasks.segmentation.engine import config_from_checkpoint

    cfg = tiny_config(data_root, tmp_path / "ddp", "train.epochs=1", "train.threads=1", "eval.overlay=false")
    save_config(cfg, tmp_path / "ddp.yaml")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "tasks.segmentation.train", "--config", str(tmp_path / "ddp.yaml")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 steps per epoch on 2 process(es)" in out.stdout  # 4 training cases, one per process per step
    # the validation cases were split over the processes and their metric sums reduced: scoring the written
    # weights in one process must give the same mean Dice
    checkpoint = tmp_path / "ddp" / "best.safetensors"
    ddp_dice = json.loads((tmp_path / "ddp" / "metrics.json").read_text())["best"]["mean_dice"]
    single, names = config_from_checkpoint(checkpoint, overrides=["train.threads=1"])
    assert evaluate(single, checkpoint, names, "validation", tmp_path / "eval").means["mean_dice"] == \
        pytest.approx(ddp_dice, abs=1e-6)
