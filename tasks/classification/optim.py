"""Optimizer and learning-rate schedule from the config, through timm's factories.

``create_optimizer_v2`` puts norms, biases and every name in the model's ``no_weight_decay()`` in a group
without weight decay; ``create_scheduler_v2`` builds the warm-up + cosine schedule, stepped per iteration
(VMamba/Swin) or per epoch (DeiT/Vim).
"""
from __future__ import annotations

from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from tasks.classification.config import ClassificationConfig
from tasks.common.optim import fused_kwargs

__all__ = ["build_optimizer", "build_scheduler"]


def build_optimizer(cfg: ClassificationConfig, model: torch.nn.Module, world_size: int) -> torch.optim.Optimizer:
    """The optimizer at the peak learning rate for ``world_size`` processes (the schedule scales it); torch's
    fused implementation where it has one (:func:`tasks.common.optim.fused_kwargs`)."""
    lr, _, _ = cfg.learning_rates(world_size)
    return create_optimizer_v2(model, opt=cfg.optim.opt, lr=lr, weight_decay=cfg.optim.weight_decay,
                               eps=cfg.optim.eps, betas=tuple(cfg.optim.betas),
                               **fused_kwargs(cfg.optim.opt, model.parameters()))


def build_scheduler(cfg: ClassificationConfig, optimizer: torch.optim.Optimizer, updates_per_epoch: int,
                    world_size: int) -> tuple[Any, int]:
    """(timm scheduler, total epochs including cool-down).

    Call ``scheduler.step_update(num_updates)`` after every optimizer step and ``scheduler.step(epoch)`` after
    every epoch; each is a no-op for the other kind of schedule.
    """
    _, warmup_lr, min_lr = cfg.learning_rates(world_size)
    s = cfg.schedule
    return create_scheduler_v2(
        optimizer, sched=s.sched, num_epochs=s.decay_epochs(), warmup_epochs=s.warmup_epochs, warmup_lr=warmup_lr,
        min_lr=min_lr, cooldown_epochs=s.cooldown_epochs, warmup_prefix=s.warmup_prefix,
        step_on_epochs=s.step_on_epochs, updates_per_epoch=updates_per_epoch)
