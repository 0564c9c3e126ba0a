"""tasks.common: configs, atomic checkpoints, RNG capture, CSV log, plots, distributed no-ops, precision."""
from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.common.checkpoint import CheckpointError, atomic_write, check_checkpoint_file, load_state, load_weights, \
    read_weights_metadata, save_state, save_weights
from tasks.common.config import ConfigError, apply_overrides, config_to_dict, describe_config, load_config, \
    parse_value, save_config
from tasks.common.csv_log import CsvLog
from tasks.common.distributed import DistContext, all_gather_objects, all_reduce_sum, distributed_job, \
    init_distributed
from tasks.common.plots import plot_curves
from tasks.common.precision import Precision, autocast, check_precision, grad_scaler
from tasks.common.rng import capture_rng_state, restore_rng_state, seed_everything


class Mode(str, enum.Enum):
    FAST = "fast"
    SLOW = "slow"


@dataclass
class Inner:
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    steps: int = 10
    betas: tuple[float, float] = (0.9, 0.999)
    mode: Mode = Mode.FAST
    clip: float | None = None
    name: str = "x"


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner, metadata={"help": "the inner section"})
    kwargs: dict = field(default_factory=dict)
    flag: bool = False


def test_yaml_file_and_overrides_are_typed(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  lr: 1e-2\n  steps: 3\nkwargs: {depths: [1, 2]}\n")
    cfg = load_config(Outer, path, ["inner.mode=slow", "inner.clip=5", "kwargs.dims=8", "flag=true",
                                    "inner.betas=[0.8, 0.9]"])
    assert cfg.inner.lr == 1e-2 and isinstance(cfg.inner.lr, float)  # YAML 1.1 alone would read "1e-2" as a str
    assert cfg.inner.steps == 3 and cfg.inner.mode is Mode.SLOW and cfg.inner.clip == 5.0
    assert cfg.inner.betas == (0.8, 0.9) and cfg.flag is True
    assert cfg.kwargs == {"depths": [1, 2], "dims": 8}  # free-form mappings merge sub-keys
    assert cfg.inner.name == "x"  # untouched keys keep their defaults
    save_config(cfg, tmp_path / "round.yaml")
    assert load_config(Outer, tmp_path / "round.yaml") == cfg


@pytest.mark.parametrize("override, message", [
    ("inner.lrr=1", r"unknown config key 'inner\.lrr'; did you mean 'inner\.lr'"),
    ("iner.lr=1", r"unknown config key 'iner'; did you mean 'inner'"),
    ("inner.lr.x=1", r"'inner\.lr' is a value, not a section"),
    ("inner.steps=1.5", r"'inner\.steps' must be an integer"),
    ("inner.mode=medium", r"'inner\.mode' must be one of \['fast', 'slow'\]"),
    ("flag=yes please", r"'flag' must be true or false"),
    ("inner.betas=[1]", r"'inner\.betas' must have 2 items"),
    ("inner.lr", r"must look like section\.key=value"),
])
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, [override])


def test_typo_in_a_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  setps: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'inner\.setps'; did you mean 'inner\.steps'"):
        load_config(Outer, path)
    path.write_text("- just a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Outer, path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_describe_lists_every_key_with_default_and_help() -> None:
    text = describe_config(Outer)
    assert "[inner] the inner section" in text
    assert "inner.lr = 0.001  peak learning rate" in text
    assert "inner.mode = fast {fast, slow}" in text
    assert "kwargs = {}" in text and "flag = false" in text


def test_parse_value_and_to_dict() -> None:
    assert parse_value("1e-3") == 1e-3 and parse_value("[1, 2]") == [1, 2] and parse_value("null") is None
    assert config_to_dict(Outer())["inner"]["mode"] == "fast"
    assert apply_overrides(Outer, {}, ["kwargs.a.b=1"]) == {"kwargs": {"a": {"b": 1}}}


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old")

    def failing(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # the temporary file is gone
    atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new"


def test_weights_round_trip_with_metadata_and_shared_storage(tmp_path: Path) -> None:
    base = torch.randn(4, 3)
    state = {"a": base, "a_view": base[1:], "b": torch.arange(5)}  # a view shares storage with "a"
    save_weights(tmp_path / "w.safetensors", state, {"epoch": 3, "model": "m"})
    back = load_weights(tmp_path / "w.safetensors")
    assert all(torch.equal(back[k], v) for k, v in state.items())
    assert read_weights_metadata(tmp_path / "w.safetensors") == {"epoch": "3", "model": "m"}


def _truncated(path: Path) -> Path:
    """A copy of ``path`` cut to half its length (an interrupted download)."""
    cut = path.with_name("cut_" + path.name)
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    return cut


def test_unreadable_checkpoints_are_named(tmp_path: Path) -> None:
    """Garbage, truncated torch archives and truncated safetensors raise CheckpointError naming the file, from the
    format check and from every loader; whole files (zip or legacy pickle, safetensors) pass the check."""
    save_weights(tmp_path / "w.safetensors", {"a": torch.randn(64, 64)}, {"k": "v"})
    save_state(tmp_path / "s.pt", {"epoch": 1, "w": torch.randn(64, 64)})
    torch.save({"w": torch.randn(3)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for whole in ("w.safetensors", "s.pt", "legacy.pt"):
        check_checkpoint_file(tmp_path / whole)
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("<html>not found</html>")
    broken = [garbage, _truncated(tmp_path / "s.pt")]
    for path in broken:
        with pytest.raises(CheckpointError, match=f"cannot read checkpoint .*{path.name}: neither"):
            check_checkpoint_file(path)
        with pytest.raises(CheckpointError, match=path.name):
            load_state(path)
    cut_weights = _truncated(tmp_path / "w.safetensors")
    for read in (check_checkpoint_file, load_weights, read_weights_metadata):
        with pytest.raises(CheckpointError, match=f"{cut_weights.name}: not a whole safetensors file"):
            read(cut_weights)
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        check_checkpoint_file(tmp_path / "missing.pt")


def test_state_with_rng_loads_weights_only_and_replays(tmp_path: Path) -> None:
    seed_everything(5)
    save_state(tmp_path / "s.pt", {"rng": capture_rng_state(), "epoch": 2})
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.random(), np.random.rand(), torch.rand(2)  # move every generator on
    state = load_state(tmp_path / "s.pt")
    restore_rng_state(state["rng"])
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    assert state["epoch"] == 2


def test_csv_log_grows_columns_and_truncates_for_resume(tmp_path: Path) -> None:
    log = CsvLog(tmp_path / "log.csv")
    log.append({"epoch": 1, "loss": 2.0})
    log.append({"epoch": 2, "loss": 1.5, "top1": 40.0})
    log.append({"epoch": 3, "loss": 1.2, "top1": 50.0})
    log.truncate_after("epoch", 2)
    assert log.rows() == [{"epoch": 1.0, "loss": 2.0}, {"epoch": 2.0, "loss": 1.5, "top1": 40.0}]
    assert (tmp_path / "log.csv").read_text().splitlines()[0] == "epoch,loss,top1"


def test_plot_writes_a_png(tmp_path: Path) -> None:
    rows = [{"epoch": e, "loss": 1 / e, "top1": 10 * e} for e in range(1, 4)]
    plot_curves(rows, "epoch", {"loss": ["loss", "absent"], "acc": ["top1"]}, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_single_process_distributed_helpers_are_no_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_distributed("cpu")
    assert ctx == DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")) and ctx.is_main
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(all_reduce_sum(x, ctx), x) and all_gather_objects({"a": 1}, ctx) == [{"a": 1}]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            init_distributed("cuda")
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="inside"):
        with distributed_job("cpu", threads=1) as job:
            assert job.is_main and torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before  # restored even on error


def test_precision_rules() -> None:
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="float16 needs CUDA"):
        check_precision(cpu, "float16")
    assert grad_scaler(cpu, Precision.BFLOAT16) is None
    with autocast(cpu, Precision.BFLOAT16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast(cpu, "float32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_command_line_helpers_order_overrides_and_report_user_errors() -> None:
    import argparse

    from tasks.common.cli import add_config_arguments, add_run_arguments, flag_overrides, run_command

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, default="digits", recipe_dir="configs/x", set_example="a.b=1")
    add_run_arguments(parser)
    parser.add_argument("--epochs", type=int)
    args = parser.parse_args(["--epochs", "3", "--set", "schedule.epochs=5", "--resume"])
    assert args.config == "digits" and args.resume is True and args.stop_after_epoch is None
    # flags first, so an explicit --set of the same key wins; flags not given add nothing
    assert flag_overrides(args, {"epochs": "schedule.epochs", "output": "train.output_dir"}) == [
        "schedule.epochs=3", "schedule.epochs=5"]

    def failing(argv: list[str] | None) -> None:
        raise ValueError("bad channel count")

    with pytest.raises(SystemExit, match="error: bad channel count"):
        run_command(failing, [], (ValueError,))

    def buggy(argv: list[str] | None) -> None:
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        run_command(buggy, [], (ValueError,))


def test_fused_optimizer_where_torch_has_one() -> None:
    """Adam / AdamW on CPU float parameters get torch's fused implementation, which makes the same update as
    the default one (up to float rounding); other optimizers and empty parameter lists keep the default."""
    from tasks.common.optim import fused_kwargs

    torch.manual_seed(0)
    models = [torch.nn.Linear(5, 3) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    assert fused_kwargs("AdamW", models[0].parameters()) == {"fused": True}
    assert fused_kwargs("adam", models[0].parameters()) == {"fused": True}
    assert fused_kwargs("sgd", models[0].parameters()) == {}
    assert fused_kwargs("adamw", []) == {}
    opts = [torch.optim.AdamW(models[0].parameters(), lr=0.1),
            torch.optim.AdamW(models[1].parameters(), lr=0.1, **fused_kwargs("adamw", models[1].parameters()))]
    x = torch.randn(4, 5)
    for _ in range(3):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
