"""SelfExtendConfig: the reach formula, the rule of thumb, and refused settings."""

from __future__ import annotations

import pytest

import selfextend_llm as se


def test_max_context_formula():
    assert se.SelfExtendConfig(4, 1024).max_context(8192) == (8192 - 1024) * 4 + 1024


@pytest.mark.parametrize(
    ("g", "w", "needle"), [(0, 512, "group_size must be >= 1"), (4, 0, "neighbor_window must be >= 1")]
)
def test_invalid_group_or_window(g, w, needle):
    with pytest.raises(ValueError, match=needle):
        se.SelfExtendConfig(g, w)


def test_window_must_leave_grouped_positions():
    with pytest.raises(ValueError, match="must be smaller than the model's trained context"):
        se.SelfExtendConfig(4, 8192).max_context(8192)


def test_for_target_keeps_grouped_positions_in_budget():
    for target in (10_000, 16_384, 32_768, 65_536):
        cfg = se.SelfExtendConfig.for_target(8192, target)
        assert cfg.max_context(8192) >= target
        # farthest grouped position used at the target stays within ~2/3 of the window
        assert (target - cfg.neighbor_window) / cfg.group_size + cfg.neighbor_window <= 8192 * 2 / 3
    assert se.SelfExtendConfig.for_target(8192, 4000).group_size == 1
