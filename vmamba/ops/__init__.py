"""Functional scan kernels. Each op has a loop reference, a chunked default and a single-step form."""
from .selective_scan import selective_scan_ref, selective_scan_step

# Placeholder until the chunked kernel lands: the default path is the loop reference.
selective_scan = selective_scan_ref

__all__ = ["selective_scan", "selective_scan_ref", "selective_scan_step"]
