"""Helpers every job shares (classification, segmentation, comparisons).

- :mod:`tasks.common.config` — nested-dataclass configs from YAML plus ``key.sub=value`` overrides, typos
  refused with a suggestion, ``describe_config`` for ``--help``.
- :mod:`tasks.common.checkpoint` — atomic writes, safetensors weights with metadata, torch training state,
  RNG capture/restore.
- :mod:`tasks.common.distributed` — torchrun process-group set-up (NCCL on CUDA, gloo on CPU), sum
  reduction, object gather, rank-0 checks.
- :mod:`tasks.common.csv_log` — restart-safe CSV metrics log.
- :mod:`tasks.common.plots` — PNG of training curves from log rows.
"""
