"""Pure-PyTorch state-space vision models: multi-direction cross-scan with swappable sequence mixers.

``import vmamba`` registers the VMamba and Vim model families with timm.
"""
from .cross_scan import ScanPattern, cross_merge, cross_scan
from .mixers import MixerType, SequenceMixer, available_mixers, create_mixer
from .ssm_layer import ConvPlacement, MultiDirectionSSM

__version__ = "0.1.0"

__all__ = [
    "ScanPattern",
    "cross_scan",
    "cross_merge",
    "MixerType",
    "SequenceMixer",
    "available_mixers",
    "create_mixer",
    "ConvPlacement",
    "MultiDirectionSSM",
]

# Model registration lives one layer up; importing it here makes ``timm.create_model("vmamba_t")`` work
# right after ``import vmamba``.
try:
    import backbones as _backbones  # noqa: F401,E402
except ImportError as _err:  # pragma: no cover - only when backbones is missing from the install
    if getattr(_err, "name", None) != "backbones":
        raise
