"""Models built on :mod:`vmamba`: VMamba and Vim (registered with timm) and segmentation networks."""
from . import vim  # noqa: F401  registers vim_* with timm
