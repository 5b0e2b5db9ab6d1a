"""Choosing G and W per prompt length, with measured defaults for the embedded model.

SelfExtend's quality depends on G and W; the best pair changes with the prompt length.  With no
fixed setting, each call takes the setting for its own length: the measured setting where one is
shipped, else plain attention inside the trained window (exactly the plain model) and the rule of
thumb beyond it.
"""

from __future__ import annotations

from .config import SelfExtendConfig

#: Measured settings for the embedded default (SmolLM2-135M-Instruct, trained on 8,192 tokens):
#: First match wins.  See BENCHMARKS.md for the grids behind them.
TUNED: dict[str, list[tuple[int, int, int, bool]]] = {
    # (longest total tokens, G, W, log-scaled queries)
    "SmolLM2-135M-Instruct": [
        # Inside the trained window: pass key 1.00 at 4k and 8k, multi-key needle 0.75 / 0.50 at 4k / 8k
        # (G12 W1024: 0.50 / 0.40; plain: 0.75 / 0.50). Prompts under 2,048 tokens are exactly plain.
        (8_192, 8, 2048, True),
        (25_600, 12, 1024, False),  # pass key 1.00 at 16k and 24k; 0.00 at 32k
        (1 << 62, 8, 2048, True),  # pass key 0.85 at 32k, 0.40 at 64k
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
    """The grouping for a call of ``total_tokens`` (prompt plus new tokens); None means plain attention.

    A model with measured settings uses them at every length (on the embedded default, grouping beats
    the plain model inside its own window too: 1.00 vs 0.40 pass-key accuracy at 8k).  Other
    models run plain inside their trained window and use the rule of thumb beyond it.
    """
    for upto, group, window, log in TUNED.get(model_name, []):
        if total_tokens <= upto and neighbor_window in (None, window):
            tuned = SelfExtendConfig(group, window, log_scale=log)
            if tuned.max_context(pretrained_context) >= total_tokens:  # else it cannot reach: use the rule
                return tuned
    if total_tokens <= pretrained_context:
        return None
    return SelfExtendConfig.for_target(pretrained_context, total_tokens, neighbor_window=neighbor_window)
