"""The mixers_train benchmark section on tiny settings: it runs, sees the real digits, reports finite numbers.

The real check (full-size vmamba_t per mixer, 50 steps) is ``python -m tasks.benchmark mixers_train``.
"""
from __future__ import annotations

import math

import pytest
import torch

from tasks.benchmark import available_sections
from tasks.benchmarks import mixers_train
from tasks.benchmarks.mixers_train import (
    TrainSettings,
    load_digits_tensors,
    train_mixer,
)

TINY = TrainSettings(steps=4, batch_size=4, img_size=16, warmup_steps=2,
                     model_kwargs=(("depths", (1, 1, 1, 1)), ("dims", 32)))


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, ...]:
    return load_digits_tensors(16)


def test_section_is_discovered() -> None:
    assert "mixers_train" in available_sections()


def test_digits_tensors_are_the_real_split(digits) -> None:
    x_train, y_train, x_val, y_val = digits
    assert x_train.shape == (1442, 3, 16, 16) and x_val.shape == (355, 3, 16, 16)
    assert set(y_train.tolist()) == set(range(10)) == set(y_val.tolist())
    assert torch.isfinite(x_train).all() and x_train.std() > 0.1  # images, not blanks


@pytest.mark.parametrize("mixer", ["mamba", "rwkv7"])
def test_train_mixer_reports_finite_numbers(mixer: str, digits) -> None:
    result = train_mixer(mixer, TINY, digits)
    assert result.model == mixer_model(mixer) and result.params > 0
    assert len(result.losses) == TINY.steps and all(math.isfinite(v) for v in result.losses)
    assert 0.0 <= result.val_top1 <= 100.0 and result.seconds > 0
    assert math.isfinite(result.ratio)


def test_same_seed_same_losses(digits) -> None:
    """Same seed, same batches: a rerun reproduces every loss (the mixers are compared on equal terms)."""
    settings = TrainSettings(steps=2, batch_size=4, img_size=16, warmup_steps=1,
                             model_kwargs=(("depths", (1, 1, 1, 1)), ("dims", 32)))
    assert train_mixer("retnet", settings, digits).losses == train_mixer("retnet", settings, digits).losses


def test_schedule_warms_up_then_decays() -> None:
    s = TrainSettings(steps=50, lr=1e-3, warmup_steps=5)
    assert s.lr_at(0) == pytest.approx(2e-4) and s.lr_at(4) == pytest.approx(1e-3)
    assert s.lr_at(5) == pytest.approx(1e-3) and s.lr_at(49) == pytest.approx(1e-4)
    assert all(s.lr_at(i) >= s.lr_at(i + 1) for i in range(5, 49))


def test_unknown_mixer_is_refused(digits) -> None:
    with pytest.raises(ValueError, match="unknown mixer 'lstm'"):
        train_mixer("lstm", TINY, digits)


def mixer_model(mixer: str) -> str:
    return mixers_train.MODELS[mixer]


def test_time_interleaved_rotates_the_order_every_round() -> None:
    """Each round starts one callable later (no callable always follows the same one); every callable gets one
    time per round, in round order."""
    from tasks.benchmarks.common import time_interleaved

    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timings = time_interleaved(fns, repeats=4, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab") + list("abc")
    assert all(len(t.seconds) == 4 for t in timings.values())
