"""CT / MRI segmentation with the 2-D and 3-D VMamba U-Nets (:mod:`backbones.segmentation`) on MONAI.

- :mod:`~tasks.segmentation.config` — every option (YAML recipes in ``configs/segmentation/``).
- :mod:`~tasks.segmentation.data` — Decathlon ``dataset.json`` lists, header checks, hold-out split, NIfTI writing.
- :mod:`~tasks.segmentation.transforms` — CT / MRI MONAI chains; albumentations slices for 2-D networks.
- :mod:`~tasks.segmentation.engine` — network from config, sliding-window inference, Dice / HD95.
- :mod:`~tasks.segmentation.train`, :mod:`~tasks.segmentation.evaluate`, :mod:`~tasks.segmentation.predict` —
  the commands (``vmamba-seg-train`` / ``-evaluate`` / ``-predict``).
- :mod:`~tasks.segmentation.mni152` — the embedded default data set built from nilearn's MNI152 template.
- :mod:`~tasks.segmentation.plots` — training curves and slice overlays.
"""
