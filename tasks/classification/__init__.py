"""Image classification on ImageFolder data with timm's pipeline: ``train`` and ``validate`` commands.

Modules: :mod:`~tasks.classification.config` (every option), :mod:`~tasks.classification.data` (folders,
datasets, loaders, Mixup), :mod:`~tasks.classification.model` (timm model + checkpoint loading),
:mod:`~tasks.classification.optim` (optimizer and schedule), :mod:`~tasks.classification.checkpoint` (run
files), :mod:`~tasks.classification.train`, :mod:`~tasks.classification.validate`,
:mod:`~tasks.classification.digits` (the embedded scikit-learn digits data set).
"""
