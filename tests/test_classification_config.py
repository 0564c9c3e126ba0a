"""Classification config, recipes and schedules: the official hyper-parameters come out as published."""
from __future__ import annotations

import pytest
import timm
import torch

import vmamba  # noqa: F401  - registers the models the recipes name
from tasks.classification.config import CONFIG_DIR, ClassificationConfig, resolve_config_path
from tasks.classification.optim import build_optimizer, build_scheduler
from tasks.common.config import ConfigError, load_config

RECIPES = ["vmamba_t", "vmamba_s", "vmamba_b", "vim_t", "vim_s", "vim_b"]


def recipe(name: str, *overrides: str) -> ClassificationConfig:
    cfg = load_config(ClassificationConfig, resolve_config_path(name), list(overrides))
    cfg.check()
    return cfg


@pytest.mark.parametrize("name", RECIPES + ["digits"])
def test_every_recipe_loads_and_names_a_registered_model(name: str) -> None:
    cfg = recipe(name)
    assert timm.is_model(cfg.model.name)


@pytest.mark.parametrize("name, gpus, drop_path, lrs", [
    # VMamba: 5e-4 / 5e-7 / 5e-6 per 512 images, all scaled to the official 8 x 128 = 1024
    ("vmamba_t", 8, 0.2, (1e-3, 1e-6, 1e-5)),
    ("vmamba_s", 8, 0.3, (1e-3, 1e-6, 1e-5)),
    ("vmamba_b", 8, 0.6, (1e-3, 1e-6, 1e-5)),
    # Vim (DeiT): only the peak lr scales; Vim-T 5e-4 x 1024/512, Vim-S --lr 1e-3 x 512/512
    ("vim_t", 8, 0.0, (1e-3, 1e-6, 1e-5)),
    ("vim_s", 8, 0.05, (1e-3, 1e-6, 1e-5)),
])
def test_official_learning_rates_and_drop_path(name: str, gpus: int, drop_path: float, lrs: tuple) -> None:
    cfg = recipe(name)
    assert cfg.model.drop_path_rate == drop_path
    assert cfg.learning_rates(gpus) == pytest.approx(lrs)
    assert cfg.schedule.epochs == 300
    assert (cfg.aug.auto_augment, cfg.aug.mixup, cfg.aug.cutmix, cfg.aug.label_smoothing, cfg.aug.reprob) == \
        ("rand-m9-mstd0.5-inc1", 0.8, 1.0, 0.1, 0.25)
    assert cfg.optim.opt == "adamw" and cfg.ema.enabled


def test_learning_rate_scales_with_the_global_batch() -> None:
    one = recipe("vmamba_t").learning_rates(1)
    four = recipe("vmamba_t").learning_rates(4)
    assert four == pytest.approx(tuple(4 * v for v in one))
    assert recipe("vmamba_t", "optim.lr=3e-4").learning_rates(4)[0] == 3e-4  # an absolute lr is not scaled


def _lr_curve(cfg: ClassificationConfig, updates_per_epoch: int, gpus: int) -> tuple[list[float], int]:
    opt = build_optimizer(cfg, torch.nn.Linear(2, 2), gpus)
    sched, total = build_scheduler(cfg, opt, updates_per_epoch, gpus)
    lrs = []
    step = 0
    for epoch in range(total):
        for _ in range(updates_per_epoch):
            lrs.append(opt.param_groups[0]["lr"])
            step += 1
            sched.step_update(num_updates=step)
        sched.step(epoch + 1)
    return lrs, total


def test_vmamba_schedule_is_300_epochs_with_20_warmup_then_cosine_per_step() -> None:
    cfg = recipe("vmamba_t")
    lrs, total = _lr_curve(cfg, updates_per_epoch=2, gpus=8)
    assert total == 300
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[40] == pytest.approx(1e-3)  # end of warm-up (20 epochs x 2 steps): the peak
    assert lrs[20] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 20 / 40)  # linear, per step
    assert lrs[-1] == pytest.approx(1e-5, rel=1e-2)  # the floor at the very end
    assert all(a >= b for a, b in zip(lrs[40:], lrs[41:]))


def test_vim_schedule_is_deit_style_per_epoch_with_cooldown() -> None:
    cfg = recipe("vim_t")
    lrs, total = _lr_curve(cfg, updates_per_epoch=2, gpus=8)
    assert total == 310  # 300 + 10 cool-down epochs
    assert lrs[0] == lrs[1] == pytest.approx(1e-6)  # constant within an epoch
    assert lrs[2 * 5] == pytest.approx(1e-3 * (1 + torch.cos(torch.tensor(torch.pi * 5 / 300)).item()) / 2 + 1e-5 *
                                       (1 - torch.cos(torch.tensor(torch.pi * 5 / 300)).item()) / 2, rel=1e-6)
    assert lrs[-1] == pytest.approx(1e-5)


def test_no_weight_decay_is_honoured() -> None:
    model = timm.create_model("vmamba_t", depths=[1, 1], dims=8, num_classes=3)
    opt = build_optimizer(recipe("vmamba_t"), model, 1)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay}
    skip = set(model.no_weight_decay())
    assert skip and skip <= names  # A_logs (2-D) would be decayed by the 1-D rule alone
    assert all(p.ndim > 1 for n, p in model.named_parameters() if id(p) not in no_decay)
    assert any(g["weight_decay"] == 0.05 for g in opt.param_groups)


def test_cross_field_errors_name_the_keys() -> None:
    with pytest.raises(ConfigError, match="batch_size must be even"):
        recipe("vmamba_t", "train.batch_size=7")
    with pytest.raises(ConfigError, match="warmup_epochs"):
        recipe("vmamba_t", "schedule.epochs=10", "schedule.warmup_epochs=10")
    with pytest.raises(ConfigError, match="must be a number"):
        recipe("vmamba_t", "optim.base_lr=fast")
    with pytest.raises(ConfigError, match=r"train\.precision' must be one of"):
        recipe("vmamba_t", "train.precision=half")


def test_unknown_recipe_lists_the_known_ones() -> None:
    with pytest.raises(FileNotFoundError, match="recipes: .*vmamba_t"):
        resolve_config_path("vmamba_tt")
    assert resolve_config_path("vim_s") == CONFIG_DIR / "vim_s.yaml"
