"""Optional fused CPU kernels, compiled just in time from C++ (``torch.utils.cpp_extension``): the selective
scans with VMamba's depthwise 2-D conv + SiLU front end and its MLP's bias + GELU, forward and backward
(``multi_scan.cpp``, ``dwconv2d_silu.h``, ``bias_gelu.h``), the forward recurrence of GLA / retention / SSD /
RWKV-7 for inference (``recurrence.cpp``) and a Mamba block's depthwise conv + SiLU for inference
(``conv_silu.cpp``), extensions built and cached separately (:class:`FusedKernel`).

The pure-PyTorch ops stay the reference and the fallback. Which path runs is chosen by
:func:`vmamba.ops.fused.scan_backend` from the ``VMAMBA_SCAN_BACKEND`` environment variable
(``auto`` (default): fused when it builds, else PyTorch; ``torch``: never fused; ``fused``: fused or an
error saying why it cannot be built) or by :func:`set_scan_backend`. The first build takes tens of
seconds and is cached per machine under ``$VMAMBA_CACHE`` (default ``~/.cache/vmamba``).
"""
from .loader import (
    FusedKernel,
    FusedUnavailable,
    ScanBackend,
    forced_scan_backend,
    fused_status,
    scan_backend,
    set_scan_backend,
    use_fused,
)
from .multi_scan import (
    fused_multi_scan,
    fused_selective_scan,
    fused_selective_scan_backward,
    fused_selective_scan_forward,
    selective_checkpoints_shape,
)
from .conv_silu import fused_conv_silu, fused_conv_silu_applies
from .dwconv2d_silu import fused_dwconv2d_silu, fused_dwconv2d_silu_applies
from .bias_gelu import fused_bias_gelu, fused_bias_gelu_applies
from .recurrence import fused_recurrence, fused_recurrence_applies

__all__ = [
    "FusedKernel",
    "FusedUnavailable",
    "ScanBackend",
    "fused_status",
    "scan_backend",
    "set_scan_backend",
    "forced_scan_backend",
    "use_fused",
    "fused_multi_scan",
    "fused_selective_scan",
    "fused_selective_scan_backward",
    "fused_selective_scan_forward",
    "selective_checkpoints_shape",
    "fused_recurrence",
    "fused_recurrence_applies",
    "fused_conv_silu",
    "fused_conv_silu_applies",
    "fused_dwconv2d_silu",
    "fused_dwconv2d_silu_applies",
    "fused_bias_gelu",
    "fused_bias_gelu_applies",
    "MAX_D_STATE",
]

MAX_D_STATE = 64  # the kernel keeps the state of one SIMD block of channels in registers / stack
