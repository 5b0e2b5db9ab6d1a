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


def test_log_scale_is_a_strength_true_and_false_are_one_and_zero():
    from selfextend_llm.config import LogScale

    assert se.SelfExtendConfig(4, 64, log_scale=True) == se.SelfExtendConfig(4, 64, log_scale=1.0)
    assert se.SelfExtendConfig(4, 64, log_scale=False) == se.SelfExtendConfig(4, 64)
    half = se.SelfExtendConfig(4, 64, log_scale=0.5)
    assert half != se.SelfExtendConfig(4, 64, log_scale=True) and isinstance(half.log_scale, float)
    assert len({half, se.SelfExtendConfig(4, 64, log_scale=1), se.SelfExtendConfig(4, 64, log_scale=True)}) == 2
    # how tables, reports and the search spell it
    labels = [se.SelfExtendConfig(4, 64, log_scale=s).label for s in (0, 1, 0.5, 2)]
    assert labels == ["G4 W64", "G4 W64 +log", "G4 W64 +log0.5", "G4 W64 +log2"]
    # what the kernels get: the trained window as the base, the strength beside it; nothing when off
    assert half.log_scaling(8192) == LogScale(8192, 0.5)
    assert se.SelfExtendConfig(4, 64).log_scaling(8192) is None


@pytest.mark.parametrize("bad", [-1, -0.5, float("nan"), float("inf"), "0.5", None])
def test_log_scale_strength_must_be_a_finite_non_negative_number(bad):
    with pytest.raises(ValueError, match="log_scale must be a strength >= 0"):
        se.SelfExtendConfig(4, 64, log_scale=bad)
