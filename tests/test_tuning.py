"""The G/W policy (``tuning.plan``): chosen settings reach their length; explicit settings are kept."""

from __future__ import annotations

import pytest


def test_chosen_grouping_always_reaches_the_length():
    from selfextend_llm.tuning import choose_config

    for name in ("SmolLM2-135M-Instruct", "some-other-model"):
        for total in (9_000, 16_000, 32_768, 100_000):
            cfg = choose_config(name, 8192, total)
            assert cfg.max_context(8192) >= total
    assert choose_config("some-other-model", 8192, 4_000) is None  # plain inside the window


def test_plan_fixed_grouping_window_is_its_reach_or_the_target():
    from selfextend_llm.config import SelfExtendConfig
    from selfextend_llm.tuning import plan

    fixed = plan("m", 8192, group_size=4, neighbor_window=1024)
    assert fixed.config == SelfExtendConfig(4, 1024)
    assert fixed.context_window == (8192 - 1024) * 4 + 1024 and not fixed.adaptive
    assert plan("m", 8192, group_size=4, neighbor_window=1024, target_context=20_000).context_window == 20_000
    assert fixed.config_for(100) == fixed.config  # a fixed grouping is used at every length
    with pytest.raises(ValueError, match="beyond what G=2, W=1024 can reach"):
        plan("m", 8192, group_size=2, neighbor_window=1024, target_context=100_000)
    # W from the rule of thumb when only G is fixed
    assert plan("m", 8192, group_size=4).config.neighbor_window == 1024


def test_plan_adaptive_keeps_an_explicit_window_at_every_length():
    """An explicit ``neighbor_window`` is never replaced, also not by the tuned table per call."""
    from selfextend_llm.tuning import TUNED, plan

    name = "SmolLM2-135M-Instruct"
    tuned_windows = {w for _, _, w, _ in TUNED[name]}
    chosen = plan(name, 8192, neighbor_window=512)
    assert chosen.adaptive and chosen.context_window == 4 * 8192
    for total in (4_000, 9_000, 20_000, 32_768):
        cfg = chosen.config_for(total)
        assert cfg is None or cfg.neighbor_window == 512, (total, cfg)
        assert cfg is None or cfg.max_context(8192) >= total
    assert 512 not in tuned_windows  # so the check above really excluded the table's windows
    # without an explicit window the tuned table decides
    assert plan(name, 8192).config_for(20_000).neighbor_window in tuned_windows


def test_plan_refuses_unreachable_targets_and_apply_uses_the_rule_of_thumb():
    from selfextend_llm.config import SelfExtendConfig
    from selfextend_llm.tuning import plan

    with pytest.raises(ValueError, match="largest group size accepted is 64"):
        plan("m", 8192, target_context=10_000_000)
    fixed = plan(None, 8192, target_context=65_536, adaptive=False)
    assert fixed.config == SelfExtendConfig.for_target(8192, 65_536) and not fixed.adaptive
