"""_triton_launch's bookkeeping on the CPU: the parameters' order rebuilt from a real
JITFunction, and the keys (the direct launch itself needs a GPU: tests/test_cuda.py)."""

from __future__ import annotations

import inspect

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.runtime.jit import JITFunction  # noqa: E402

from an_search.layers import _triton_launch as tl  # noqa: E402


def _body(a_ptr, b_ptr, n, scale, X: triton.language.constexpr, Y: triton.language.constexpr = 4):  # noqa: ANN001, ANN202, N803
    pass


KERNEL = JITFunction(_body)  # (not triton.jit: the tests run Triton's interpreter)


def test_bound_rebuilds_the_declared_order() -> None:
    a, b = torch.zeros(4), torch.ones(4)
    rest = tl._rest(KERNEL, 3)
    assert rest == (("scale", inspect.Parameter.empty), ("X", inspect.Parameter.empty), ("Y", 4))
    got = tl._bound((a, b, 7), {"X": 2, "scale": 0.5, "num_warps": 4}, rest)
    assert got[:2] == [a, b] and got[2:] == [7, 0.5, 2, 4]  # Y: its default; num_warps: none
    assert tl._bound((a, b, 7), {"scale": 0.5}, rest) is None  # X missing
    assert tl._bound((a, b, 7, 0.5, 3, 9), {}, tl._rest(KERNEL, 6)) == [a, b, 7, 0.5, 3, 9]
    assert [p.name for p in KERNEL.params] == list(inspect.signature(_body).parameters)


def test_keys_take_what_triton_specialises_on() -> None:
    def key(*args: object, **kwargs: object) -> tuple | None:
        return tl._key(KERNEL, args, kwargs)

    assert key(1, 2.0, X=3) != key(2, 2.0, X=3)  # ints by value (1, divisibility, width)
    assert key(16, 2.0, X=3) != key(32, 2.0, X=3) and key(1, 2.0, X=3) != key(1, 2.0, X=4)
    assert key(1, 2.0, X=3) == key(1, 0.5, X=3)  # floats: never specialised
    assert key(True, 2.0) != key(1, 2.0) and key(None, 2.0) != key(0, 2.0)
    assert key(1, 2.0, X=3) != key(1, 2.0, Y=3)  # which parameter a keyword fills
    assert key(torch.zeros(3), 1) is None  # a CPU tensor: the usual path
    assert key("text") is None and key((1, 2)) is None


def test_an_empty_hook_chain_is_no_hook() -> None:
    chain = pytest.importorskip("triton.knobs").HookChain
    hooked = chain()
    hooked.add(print)
    assert tl._hookless(None) and tl._hookless(chain())  # Triton 3.6 on: an empty chain
    assert not tl._hookless(hooked) and not tl._hookless(print)  # a profiler's: usual path


def test_the_cache_starts_over_when_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tl, "_cache", {})
    monkeypatch.setattr(tl, "_MAX_KEYS", 3)
    for i in range(3):
        tl._keep((i,), (None, ()))
    assert list(tl._cache) == [(0,), (1,), (2,)]
    tl._keep((3,), (None, ()))  # full: emptied, then this key
    assert list(tl._cache) == [(3,)]
