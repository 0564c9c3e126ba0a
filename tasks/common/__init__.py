"""Helpers every job shares (classification, segmentation, comparisons).

- :mod:`tasks.common.config` — nested-dataclass configs from YAML plus ``key.sub=value`` overrides, typos
  refused with a suggestion, ``describe_config`` for ``--help``.
- :mod:`tasks.common.checkpoint` — atomic writes, safetensors weights with metadata, torch training state.
- :mod:`tasks.common.rng` — seeding, and capture/restore of every generator for exact resumption.
- :mod:`tasks.common.distributed` — torchrun process-group set-up (NCCL on CUDA, gloo on CPU; the
  ``distributed_job`` context also sets and restores the thread count), sum reduction, object gather, rank-0
  checks.
- :mod:`tasks.common.precision` — autocast dtype enum, device check (no float16 on CPU), GradScaler.
- :mod:`tasks.common.csv_log` — restart-safe CSV metrics log.
- :mod:`tasks.common.plots` — PNG of training curves from log rows.
"""
