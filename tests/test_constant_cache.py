"""vmamba.constant_cache: one build per key, plain tensors only, whatever mode the first call ran in."""
from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from vmamba.constant_cache import cached_constant

_keys = itertools.count()


def _counting_builder():
    calls = []

    def build() -> torch.Tensor:
        calls.append(1)
        return torch.arange(5)

    return build, calls


def test_built_once_per_key():
    key = ("test", next(_keys))
    build, calls = _counting_builder()
    first = cached_constant(key, build)
    assert cached_constant(key, build) is first and len(calls) == 1
    assert cached_constant(("test", next(_keys)), build) is not first and len(calls) == 2


def test_first_call_under_inference_mode_keeps_a_normal_tensor():
    key = ("test", next(_keys))
    build, _ = _counting_builder()
    with torch.inference_mode():
        value = cached_constant(key, build)
    assert not value.is_inference()
    x = torch.ones(5, requires_grad=True)
    (x * value).sum().backward()  # usable by autograd outside inference mode
    torch.testing.assert_close(x.grad, torch.arange(5.0))


def test_tensors_built_under_fake_mode_are_not_kept():
    key = ("test", next(_keys))
    build, calls = _counting_builder()
    with FakeTensorMode():
        fake = cached_constant(key, build)
    assert type(fake) is not torch.Tensor
    real = cached_constant(key, build)
    assert type(real) is torch.Tensor and len(calls) == 2
    torch.testing.assert_close(real, torch.arange(5))


def test_threads_share_one_tensor_per_key():
    keys = [("test-threads", next(_keys)) for _ in range(8)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda i: cached_constant(keys[i % 8], lambda: torch.arange(i % 8 + 1)), range(400)))
    for i, value in enumerate(results):
        assert value is cached_constant(keys[i % 8], lambda: torch.zeros(1))  # the kept one, not rebuilt
        torch.testing.assert_close(value, torch.arange(i % 8 + 1))


def test_only_the_most_recent_keys_are_kept():
    build, calls = _counting_builder()
    first = ("test-bound", next(_keys))
    cached_constant(first, build)
    for _ in range(300):
        cached_constant(("test-bound", next(_keys)), build)
    assert len(calls) == 301
    cached_constant(first, build)  # evicted long ago: built again
    assert len(calls) == 302
