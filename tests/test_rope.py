"""The rotation math that every path builds on."""

from __future__ import annotations

import torch


def test_rotate_composes():
    from selfextend_llm.rope import rotate

    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).double() / 16))
    x = torch.randn(1, 2, 5, 16, dtype=torch.float64)
    a, b = torch.randint(-50, 50, (1, 5)), torch.randint(-50, 50, (1, 5))
    for layout in ("half", "interleaved"):
        assert torch.allclose(rotate(rotate(x, a, inv, layout), b, inv, layout), rotate(x, a + b, inv, layout))
