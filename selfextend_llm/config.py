"""SelfExtend hyper-parameters: the group size G and the neighbor window W.

Kept free of torch and transformers so that the integrations and the CLI can validate a
setting before a model is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

#: Fraction of the trained window that the grouped positions may use.  The paper's rule of
#: thumb is "about half to two thirds"; 0.6 sits in the middle of that range.
GROUPED_BUDGET = 0.6
#: Largest group size a ``target_context`` may call for.  The quality grids (BENCHMARKS.md) measured G up
#: to 17; 64 leaves room for models with short trained windows, and past it one grouped position would
#: stand for more tokens than any setting was ever checked with, so such targets are refused, not guessed.
MAX_MEASURED_GROUP = 64
#: How far above the plain model's perplexity a tuned setting may go inside the trained window, where the
#: model's own positions are exact (``tune``'s perplexity guard; issue 17's target).
PERPLEXITY_TOLERANCE = 0.01
#: Strengths of log-scaled queries that ``tune``'s generated candidates try past the window (``log="on"``).  On the
#: embedded default the full scaling (1) helped multi-key needles and cost single-fact answers; half of it
#: kept most of both and was chosen at 28k, 64k and 128k and for 24k chat calls (BENCHMARKS.md, round 8), the full
#: one at 32k.
LOG_STRENGTHS = (0.5, 1.0)


class LogScale(NamedTuple):
    """Log-scaled queries past ``base`` tokens (the trained window), at ``strength`` (1: LongLM's scaling).

    A plain tuple of an int and a float: the kernels take it as a constant, torch.compile included.
    """

    base: int
    strength: float = 1.0


@dataclass(frozen=True)
class SelfExtendConfig:
    """Group size ``G`` and neighbor window ``W`` of SelfExtend.

    Keys closer than ``W`` tokens to a query keep their exact relative position; farther keys
    are seen through grouped positions ``pos // G`` shifted by ``W - W // G`` so that the two
    regimes meet at distance ``W``.  The farthest grouped relative position for a context of
    ``n`` tokens is about ``(n - W) / G + W``, which must stay inside the trained window ``L``:
    hence the reach ``(L - W) * G + W``.

    ``log_scale`` is the strength ``s`` of log-scaled queries: past the trained window a query at
    position ``pos`` is multiplied by ``1 + s * (log(pos + 1) / log(L) - 1)`` (never less than 1, so
    nothing changes inside the window).  ``0`` (or False) is off, the default; ``1`` (or True) is the
    scaling found in the LongLM code, ``log(pos + 1) / log(L)``.  Strengths in between or above exist
    because on the embedded default the full scaling helps multi-key needles and costs single-fact
    answers past the window (BENCHMARKS.md): the strength is a dial between the two, tuned like G and W.
    """

    group_size: int
    neighbor_window: int
    log_scale: float = 0.0

    def __post_init__(self) -> None:
        for name in ("group_size", "neighbor_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
        strength = self.log_scale
        if not isinstance(strength, (bool, int, float)) or not math.isfinite(strength) or strength < 0:
            raise ValueError(
                f"log_scale must be a strength >= 0 (0 or False: off; 1 or True: LongLM's log(pos)/log(L)), "
                f"got {strength!r}"
            )
        object.__setattr__(self, "log_scale", float(strength))  # True and 1.0 are one setting
        if self.group_size < 1:
            raise ValueError(
                f"group_size must be >= 1, got {self.group_size}: use 1 for plain attention or 2-16 to extend"
            )
        if self.neighbor_window < 1:
            raise ValueError(
                f"neighbor_window must be >= 1, got {self.neighbor_window}: it is the number of nearby tokens "
                "that keep exact positions (512-2048 is typical)"
            )

    def validate_for(self, pretrained_context: int) -> None:
        """Raise ``ValueError`` when ``W`` leaves no grouped positions inside the trained window."""
        if self.neighbor_window >= pretrained_context:
            raise ValueError(
                f"neighbor_window={self.neighbor_window} must be smaller than the model's trained context "
                f"({pretrained_context} tokens), or no grouped positions fit inside it; pick a window of at most "
                f"{pretrained_context // 2}"
            )

    @property
    def log_suffix(self) -> str:
        """How names spell the strength: ``""`` off, ``"+log"`` at 1, ``"+log0.5"`` otherwise."""
        if not self.log_scale:
            return ""
        return "+log" if self.log_scale == 1 else f"+log{self.log_scale:g}"

    @property
    def label(self) -> str:
        """The setting as reports print it: ``"G8 W2048"``, ``"G8 W2048 +log"``, ``"G8 W2048 +log0.5"``."""
        return f"G{self.group_size} W{self.neighbor_window}" + (f" {self.log_suffix}" if self.log_scale else "")

    def log_scaling(self, pretrained_context: int) -> LogScale | None:
        """What the kernels multiply queries by (:func:`selfextend_llm.rope.log_scale_factor`); None when off."""
        return LogScale(pretrained_context, self.log_scale) if self.log_scale else None

    def max_context(self, pretrained_context: int) -> int:
        """Longest context whose grouped positions stay inside the trained window: ``(L - W) * G + W``."""
        self.validate_for(pretrained_context)
        return (pretrained_context - self.neighbor_window) * self.group_size + self.neighbor_window

    @classmethod
    def for_target(
        cls, pretrained_context: int, target_context: int, *, neighbor_window: int | None = None
    ) -> SelfExtendConfig:
        """Pick ``G`` and ``W`` for ``target_context`` tokens on a model trained on ``pretrained_context``.

        ``W`` defaults to an eighth of the trained window (1024 for an 8k model), clamped to
        [128, 4096]; ``G`` is the smallest group size whose grouped positions stay within
        ``GROUPED_BUDGET`` of the trained window at the target length, so the model sees
        positions it knows well rather than ones at the edge of its training.
        """
        if pretrained_context < 2:
            raise ValueError(f"pretrained_context must be >= 2, got {pretrained_context}")
        if target_context < 1:
            raise ValueError(f"target_context must be >= 1, got {target_context}")
        if neighbor_window is None:
            window = min(4096, max(128, pretrained_context // 8), pretrained_context // 2)
        else:  # an explicit window is kept as given, or refused: never silently replaced
            window = neighbor_window
            cls(1, window).validate_for(pretrained_context)
        budget = max(window + 1, int(pretrained_context * GROUPED_BUDGET))
        if target_context <= budget:
            return cls(group_size=1, neighbor_window=window)
        group = max(1, math.ceil((target_context - window) / (budget - window)))
        return cls(group_size=group, neighbor_window=window)


def check_reach(trained: int, target: int, neighbor_window: int | None = None) -> None:
    """Refuse a target that needs a group size beyond any measured one, stating the largest reach."""
    needed = SelfExtendConfig.for_target(trained, target, neighbor_window=neighbor_window)
    if needed.group_size > MAX_MEASURED_GROUP:
        largest = SelfExtendConfig(MAX_MEASURED_GROUP, needed.neighbor_window).max_context(trained)
        raise ValueError(
            f"target_context={target} would need group size {needed.group_size} on a model trained on {trained} "
            f"tokens; the largest group size accepted is {MAX_MEASURED_GROUP} (a reach of {largest} "
            "tokens; quality was measured up to G=17): lower target_context, or fix group_size yourself if you "
            "accept an unmeasured setting"
        )
