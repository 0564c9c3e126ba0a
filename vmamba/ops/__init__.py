"""Functional scan kernels (each with a loop reference, a chunked default and a single-step form), and the fused
ops around them (depthwise conv + SiLU, linear + GELU) with their pure-PyTorch references."""
from .depthwise_conv import (
    depthwise_conv1d_silu,
    depthwise_conv1d_silu_ref,
    depthwise_conv2d_silu,
    depthwise_conv2d_silu_ref,
)
from .linear import linear
from .linear_gelu import linear_gelu, linear_gelu_ref
from .retention import RetentionMode, retention, retention_mixing_matrix, retention_ref, retention_step
from .rwkv7 import rwkv7, rwkv7_mixing_matrix, rwkv7_ref, rwkv7_step
from .gla import gla, gla_mixing_matrix, gla_quadratic, gla_ref, gla_step
from .selective_scan import (
    selective_scan,
    selective_scan_mixing_matrix,
    selective_scan_quadratic,
    selective_scan_ref,
    selective_scan_step,
)
from .ssd import ssd, ssd_mixing_matrix, ssd_quadratic, ssd_ref, ssd_step

__all__ = ["selective_scan", "selective_scan_ref", "selective_scan_step", "selective_scan_quadratic"]
__all__ += ["selective_scan_mixing_matrix"]
__all__ += ["RetentionMode", "retention", "retention_ref", "retention_step", "retention_mixing_matrix"]
__all__ += ["rwkv7", "rwkv7_ref", "rwkv7_step", "rwkv7_mixing_matrix"]
__all__ += ["ssd", "ssd_ref", "ssd_step", "ssd_quadratic", "ssd_mixing_matrix"]
__all__ += ["gla", "gla_ref", "gla_step", "gla_quadratic", "gla_mixing_matrix"]
__all__ += ["depthwise_conv1d_silu", "depthwise_conv1d_silu_ref", "depthwise_conv2d_silu", "depthwise_conv2d_silu_ref"]
__all__ += ["linear", "linear_gelu", "linear_gelu_ref"]
