"""The rotation math that every path builds on."""

from __future__ import annotations

import pytest
import torch


def test_rotate_composes():
    from selfextend_llm.rope import rotate

    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).double() / 16))
    x = torch.randn(1, 2, 5, 16, dtype=torch.float64)
    a, b = torch.randint(-50, 50, (1, 5)), torch.randint(-50, 50, (1, 5))
    for layout in ("half", "interleaved"):
        assert torch.allclose(rotate(rotate(x, a, inv, layout), b, inv, layout), rotate(x, a + b, inv, layout))


def test_log_scale_factor_is_one_inside_the_window_and_the_strength_scales_its_rise():
    import math

    from selfextend_llm.config import LogScale
    from selfextend_llm.rope import log_scale, log_scale_factor

    base = 64
    positions = torch.tensor([[0, 10, 63, 64, 200, 4095]])
    for strength in (0.25, 0.5, 1.0, 2.0):
        got = log_scale_factor(positions, LogScale(base, strength), torch.float64)[0, 0, :, 0].tolist()
        want = [max(1.0, 1 + strength * (math.log(p + 1) / math.log(base) - 1)) for p in positions[0].tolist()]
        assert got == pytest.approx(want, rel=1e-12)
        assert got[:3] == [1.0, 1.0, 1.0] and got[3] > 1  # inside the base (the trained window) nothing changes
    # strength 1 is LongLM's log(pos + 1) / log(L); half strength rises half as far above 1
    full = log_scale_factor(positions, LogScale(base, 1.0), torch.float64)
    half = log_scale_factor(positions, LogScale(base, 0.5), torch.float64)
    assert torch.allclose(full[0, 0, -1, 0], torch.tensor(math.log(4096) / math.log(64), dtype=torch.float64))
    assert torch.allclose(half - 1, (full - 1) / 2)
    query = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    assert torch.equal(log_scale(query, positions, None), query)  # off: the queries themselves
    memo: dict = {}
    once = log_scale(query, positions, LogScale(base, 0.5), memo)
    assert torch.equal(once, query * half) and torch.equal(log_scale(query, positions, LogScale(base, 0.5), memo), once)
    assert not torch.equal(log_scale(query, positions, LogScale(base, 1.0), memo), once)  # the memo keys the strength
