"""Models built on :mod:`vmamba`: VMamba and Vim (registered with timm) and segmentation networks."""
