"""FLOP accounting for the scan ops, visible to :class:`torch.utils.flop_counter.FlopCounterMode`.

Convention. Scan costs are written as multiply-accumulates (MACs), the unit of the official VMamba
numbers (its fvcore hook counts the selective scan as ``9 * B * L * D * N`` MACs, plus ``B * D * L`` for the
``D`` skip and ``B * D * L`` for the ``z`` gate). ``torch.utils.flop_counter`` reports FLOPs and counts a
matmul as 2 FLOPs per MAC, so a registered op reports ``2 * MACs``: divide a FlopCounterMode total by 2
to compare with official "GMACs" / "GFLOPs (fvcore)" figures. A backward op reports twice its forward's
MACs (two products per forward product, as torch counts matmul backward).

How an op registers (once, at import of the module defining it)::

    op = torch.library.custom_op("vmamba::my_scan", my_scan_impl, mutates_args=())
    register_macs(torch.ops.vmamba.my_scan, lambda q, k, v, *rest, **kw: q[0] * q[1] * q[2] * v[-1])

The formula receives the op's arguments with every tensor replaced by its shape (``torch.Size``; ``None``
stays ``None``, other values are passed as they are) and returns MACs as an ``int``.
Tensors produced inside a registered op are not counted again (FlopCounterMode sees only the op itself).

API:
    :func:`register_macs` -- register an op's MAC formula (FLOPs = 2 x MACs), idempotent.
    :func:`selective_scan_macs` -- the official S6 count.
    :func:`count_flops` -- total FLOPs of a callable, as FlopCounterMode reports them.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

__all__ = ["FLOPS_PER_MAC", "BACKWARD_MAC_FACTOR", "register_macs", "selective_scan_macs", "count_flops"]

FLOPS_PER_MAC = 2  # torch.utils.flop_counter's convention (a matmul is 2 * m * n * k FLOPs)
BACKWARD_MAC_FACTOR = 2  # a scan's backward is counted as twice its forward, like matmul's


def register_macs(op: torch._ops.OpOverloadPacket, macs: Callable[..., int]) -> None:
    """Make FlopCounterMode count ``FLOPS_PER_MAC * macs(*arg_shapes, **kwarg_shapes)`` for ``op``.

    Args:
        op: a dispatcher op packet such as ``torch.ops.vmamba.selective_scan`` (a ``torch.library.custom_op``).
        macs: the MAC formula; tensors arrive as shapes (see the module docstring).

    Registering the same op twice keeps the first formula (re-imports are harmless).
    """
    if op in flop_registry:
        return

    def formula(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return FLOPS_PER_MAC * int(macs(*args, **kwargs))

    register_flop_formula(op)(formula)


def selective_scan_macs(
    u_shape: torch.Size | tuple[int, ...], d_state: int, with_d: bool = False, with_z: bool = False
) -> int:
    """Official VMamba count for one selective scan: ``9 * B * L * D * N`` (+ ``B*D*L`` each for D and z).

    Args:
        u_shape: ``(B, D, L)``.
        d_state: ``N``.
    """
    batch, dim, length = u_shape
    macs = 9 * batch * length * dim * d_state
    return macs + batch * dim * length * (int(with_d) + int(with_z))


def count_flops(fn: Callable[[], object]) -> int:
    """Run ``fn()`` under FlopCounterMode and return the total FLOPs (registered scan ops included)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _register_cpu_attention() -> None:
    """Count ``scaled_dot_product_attention`` on CPU too.

    PyTorch's counter knows only the CUDA attention kernels; the CPU flash kernel (what timm's ViT, DeiT,
    Swin and Vim-style attention run on a CPU) would count zero, understating their FLOPs and hiding the
    quadratic growth. The formulas are PyTorch's own for the CUDA kernels; skipped if PyTorch adds them.
    """
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    forward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None and forward not in flop_registry:

        def forward_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
            return sdpa_flop_count(query, key, value)

        register_flop_formula(forward)(forward_flops)
    if backward is not None and backward not in flop_registry:

        def backward_flops(grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None,
                           **kwargs: Any) -> int:
            return sdpa_backward_flop_count(grad_out, query, key, value)

        register_flop_formula(backward)(backward_flops)


_register_cpu_attention()
