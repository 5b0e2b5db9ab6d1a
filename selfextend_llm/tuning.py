"""Choosing G and W per prompt length, with measured defaults for the embedded model.

SelfExtend's quality depends on G and W; the best pair changes with the prompt length.  With no
fixed setting, each call takes the setting for its own length: plain attention inside the
trained window (exactly the plain model), then the smallest measured-good grouping beyond it.
"""

from __future__ import annotations

from .config import SelfExtendConfig

#: Measured settings for the embedded default (SmolLM2-135M-Instruct, trained on 8,192 tokens):
#: First match wins.  See BENCHMARKS.md for the grids behind them.
TUNED: dict[str, list[tuple[int, int, int, bool]]] = {
    # (longest total tokens, G, W, log-scaled queries)
    "SmolLM2-135M-Instruct": [
        (12_288, 4, 1024, False),
        (20_480, 12, 1024, False),
        (1 << 62, 8, 2048, True),
    ],
}


def choose_config(
    model_name: str,
    pretrained_context: int,
    total_tokens: int,
    ceiling: SelfExtendConfig | None,
    *,
    neighbor_window: int | None = None,
) -> SelfExtendConfig | None:
    """The grouping for a call of ``total_tokens`` (prompt plus new tokens); None means plain attention."""
    if total_tokens <= pretrained_context:
        return None
    for upto, group, window, log in TUNED.get(model_name, []):
        if total_tokens <= upto and neighbor_window in (None, window):
            return SelfExtendConfig(group, window, log_scale=log)
    return SelfExtendConfig.for_target(pretrained_context, total_tokens, neighbor_window=neighbor_window)
