"""Side-by-side comparison of vision models on this machine: cost, speed, memory growth and accuracy.

``python -m tasks.compare`` (console script ``vmamba-compare``) reads ``configs/compare/*.yaml``.
Modules: :mod:`.config` (settings), :mod:`.models` (building by name), :mod:`.speed` (isolated per-cell
measurement), :mod:`.growth` (log-log exponents), :mod:`.accuracy` (training through the task jobs),
:mod:`.runner` (the run), :mod:`.report` (output folder), :mod:`.cli` (command line).
"""
from .config import CompareConfig, ModelSpec, load_config
from .runner import CompareResult, run_compare

__all__ = ["CompareConfig", "ModelSpec", "load_config", "CompareResult", "run_compare"]
