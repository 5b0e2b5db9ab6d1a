"""The G/W policy, in one place: which grouping a model runs with, and how far it may be asked to read.

SelfExtend's quality depends on G and W; the best pair changes with the prompt length.  With no
fixed setting, each call takes the setting for its own length: the measured setting where one is
shipped, else plain attention inside the trained window (exactly the plain model) and the rule of
thumb beyond it.  :func:`plan` turns what a caller asked for (``load``'s or ``apply``'s arguments)
into a :class:`Plan`; :meth:`Plan.config_for` gives the grouping of each call.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import SelfExtendConfig, check_reach

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
    model_name: str | None,
    pretrained_context: int,
    total_tokens: int,
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


@dataclass(frozen=True)
class Plan:
    """What a model runs with, decided once when SelfExtend is turned on.

    ``config`` is the grouping set up front; ``context_window`` the longest prompt plus answer
    that callers are promised; ``adaptive`` whether each call re-chooses its grouping for its own
    length (:meth:`config_for`), keeping an explicit ``neighbor_window`` as given.
    """

    config: SelfExtendConfig
    context_window: int
    adaptive: bool
    model_name: str | None
    pretrained_context: int
    neighbor_window: int | None = None

    def config_for(self, total_tokens: int) -> SelfExtendConfig | None:
        """The grouping for a call of ``total_tokens`` (prompt plus new tokens); None: exactly plain."""
        if not self.adaptive:
            return self.config
        return choose_config(
            self.model_name, self.pretrained_context, total_tokens, neighbor_window=self.neighbor_window
        )


def plan(
    model_name: str | None,
    pretrained_context: int,
    *,
    target_context: int | None = None,
    group_size: int | None = None,
    neighbor_window: int | None = None,
    config: SelfExtendConfig | None = None,
    adaptive: bool = True,
) -> Plan:
    """Turn a caller's request into a :class:`Plan`, refusing what cannot be reached.

    * ``config`` or ``group_size`` fixes the grouping (``W`` from the rule of thumb when only ``G``
      is given); the window is ``target_context``, else the setting's reach ``(L - W) * G + W``.
    * Otherwise the target (default: four times the trained window) is checked against the
      largest group size accepted; ``adaptive=True`` (``load``) then lets each call take the
      measured setting for its length, ``adaptive=False`` (``apply``) fixes the rule of thumb for
      the target.
    """
    trained = pretrained_context
    target = target_context or 4 * trained
    if config is None and group_size is not None:
        window = neighbor_window or SelfExtendConfig.for_target(trained, target).neighbor_window
        config = SelfExtendConfig(group_size, window)
    if config is not None:
        reach = config.max_context(trained)
        if target_context is not None and target_context > reach:
            raise ValueError(
                f"target_context={target_context} is beyond what G={config.group_size}, W={config.neighbor_window} "
                f"can reach on a model trained on {trained} tokens ({reach}); raise group_size, or leave the "
                "grouping out to let SelfExtend choose"
            )
        return Plan(config, target_context or reach, False, model_name, trained, config.neighbor_window)
    check_reach(trained, target, neighbor_window)
    if not adaptive:
        config = SelfExtendConfig.for_target(trained, target, neighbor_window=neighbor_window)
        return Plan(config, target, False, model_name, trained, neighbor_window)
    config = choose_config(model_name, trained, target, neighbor_window=neighbor_window) or SelfExtendConfig(
        1, neighbor_window or min(trained // 2, 1024)
    )
    return Plan(config, max(target, trained), True, model_name, trained, neighbor_window)
