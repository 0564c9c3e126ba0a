"""Regenerate ``vmamba_reference.{json,safetensors}`` from the official VMamba code (not run by the tests).

Usage: ``python tests/data/make_vmamba_reference.py OFFICIAL_DIR`` where ``OFFICIAL_DIR`` holds
``classification/models/{vmamba,csms6s,csm_triton}.py`` of MzeroMiko/VMamba at 2ed52ead, made importable
on CPU: the ``with torch.cuda.device(...)`` lines of ``cross_scan_fn`` / ``cross_merge_fn`` dropped, the
``fvcore`` import and the ``mamba2`` import removed (the same edits as ``shared/fixtures/vmamba_official``).
Run with ``torch.set_num_threads(2)``.

What it records (the tests compare against these numbers):

* ``v0``: a scaled-down vanilla VMamba (z-gate, d_state 16, patch stem, patch merging, no MLP) with
  weights drawn like the shared parity fixture (official init with ``torch.manual_seed(0)``, then every
  parameter ``+= s * randn`` in ``named_parameters()`` order from ``Generator().manual_seed(123)``; s = 0.5
  for A_logs, 1.0 for x_proj_weight, 0.05 otherwise; dt_projs_bias += 1). Input ``(2, 3, 40, 72)`` from
  ``torch.manual_seed(1)``: non-square, and odd maps (5x9, 3x5) exercise patch merging's padding.
  Weights are stored under the official key names in ``vmamba_reference.safetensors``.
* ``v2_crops``: official logits of the shared ``parity_small`` model on non-square crops of its input
  (the shared fixture only has square 64x64 maps, where an H/W mix-up in the merge is invisible).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[2] / "shared" / "fixtures" / "vmamba_official" / "parity_small"

V0_KWARGS = dict(
    depths=[1, 1, 1, 1], dims=4, drop_path_rate=0.1, patch_size=4, in_chans=3, num_classes=5,
    ssm_d_state=16, ssm_ratio=2.0, ssm_dt_rank="auto", ssm_act_layer="silu", ssm_conv=3, ssm_conv_bias=True,
    ssm_drop_rate=0.0, ssm_init="v0", forward_type="v0", mlp_ratio=0.0, mlp_act_layer="gelu",
    mlp_drop_rate=0.0, gmlp=False, patch_norm=True, norm_layer="ln", downsample_version="v1",
    patchembed_version="v1", use_checkpoint=False, posembed=False, imgsize=64,
)
V2_CROPS = {"w48": (slice(None), slice(None), slice(None), slice(0, 48)),
            "h40": (slice(None), slice(None), slice(0, 40), slice(None))}


def main(official_dir: str) -> None:
    torch.set_num_threads(2)
    sys.path.append(official_dir)
    spec = importlib.util.spec_from_file_location("official_vmamba", Path(official_dir) / "vmamba.py")
    official = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(official)

    torch.manual_seed(0)
    v0 = official.VSSM(**V0_KWARGS).eval()
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in v0.named_parameters():
            s = 0.5 if "A_logs" in name else 1.0 if "x_proj_weight" in name else 0.05
            p += s * torch.randn(p.shape, generator=g)
            if "dt_projs_bias" in name:
                p += 1.0
    torch.manual_seed(1)
    x = torch.randn(2, 3, 40, 72)
    with torch.no_grad():
        v0_logits = v0(x)
    save_file({k: v.contiguous() for k, v in v0.state_dict().items()}, HERE / "vmamba_reference.safetensors")

    cfg = json.loads((SHARED / "config.json").read_text())["constructor_kwargs"]
    v2 = official.VSSM(**cfg).eval()
    v2.load_state_dict(torch.load(SHARED / "state_dict.pt"))
    inp = torch.load(SHARED / "input.pt")
    with torch.no_grad():
        crops = {name: v2(inp[idx]).tolist() for name, idx in V2_CROPS.items()}

    record = {
        "source": "MzeroMiko/VMamba 2ed52ead classification/models/vmamba.py, pure-PyTorch CPU path, 2 threads",
        "v0": {"official_kwargs": V0_KWARGS, "input": {"seed": 1, "shape": [2, 3, 40, 72]},
               "logits": v0_logits.tolist()},
        "v2_crops": {"crops": {"w48": "input[..., :48]", "h40": "input[..., :40, :]"}, "logits": crops},
    }
    (HERE / "vmamba_reference.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
