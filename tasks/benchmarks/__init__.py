"""Benchmark sections for ``python -m tasks.benchmark``; each module exposes ``run(quick: bool) -> None``."""
