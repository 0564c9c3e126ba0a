"""A process-wide cache of small constant tensors (scan orders of a map size), safe across execution modes.

``functools.lru_cache`` on a tensor-returning function keeps whatever the first call made: an inference
tensor when that call ran under ``torch.inference_mode`` (which a later training step can neither save for
backward nor write), or a fake tensor when it ran while ``torch.export`` / ``FakeTensorMode`` traced the model
(which a later eager call cannot compute with). :func:`cached_constant` builds outside inference mode, keeps
only plain tensors built outside tracing, and during tracing neither reads nor writes the cache (the tensor
becomes a constant of the traced graph).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch
from torch import Tensor

__all__ = ["cached_constant"]

_MAX_ENTRIES = 256
_CACHE: OrderedDict[Hashable, Tensor] = OrderedDict()
_LOCK = threading.Lock()  # models may run in several Python threads (a serving process)


def cached_constant(key: Hashable, build: Callable[[], Tensor]) -> Tensor:
    """``build()``'s tensor for ``key``, built once per process (at most the last 256 keys are kept).

    ``key`` must identify the result completely (e.g. the builder's name and its arguments); the caller
    must not modify the returned tensor.
    """
    if torch.compiler.is_compiling():
        return build()
    with _LOCK:
        cached = _CACHE.get(key)
        if cached is not None:
            _CACHE.move_to_end(key)
            return cached
    with torch.inference_mode(False):
        value = build()
    if type(value) is Tensor:  # not a FakeTensor / FunctionalTensor of a trace
        with _LOCK:
            value = _CACHE.setdefault(key, value)  # another thread may have built it meanwhile: keep one
            _CACHE.move_to_end(key)
            if len(_CACHE) > _MAX_ENTRIES:
                _CACHE.popitem(last=False)
    return value
