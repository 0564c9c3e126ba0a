"""Models built on :mod:`vmamba`: VMamba and Vim (registered with timm) and segmentation networks."""
from . import vmamba  # noqa: F401  registers vmamba_* with timm
from . import vim  # noqa: F401  registers vim_* with timm
