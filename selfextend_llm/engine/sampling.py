"""One sampler for every path: the single-sequence ``generate`` call, the batcher and the server.

Before, the single path sampled with transformers' defaults (the model's ``top_k=50`` and the global
seed) and the batcher over the full vocabulary with a per-row generator, so one seed gave two answers.
Now a request's :class:`Sampling` is applied by :func:`pick` on both, with a generator of its own:
the same seed gives the same tokens alone and batched.  Order (vLLM's and transformers'): repetition
penalty, temperature, top-k, top-p, min-p, then a draw.  Greedy decoding (temperature 0) is the argmax
of the (penalised) logits, so without a penalty it is exactly what it always was.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import validation

#: Temperatures below this decode greedily: sampling at, say, 1e-300 divides logits into infinities
#: (NaN probabilities), while its distribution is the argmax anyway.
MIN_SAMPLING_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class Sampling:
    """How a request picks each token; made by :meth:`checked` on every path (the single call, the batcher,
    the server), so every path refuses the same values with the same message.

    * ``temperature``: 0 (or below ``1e-4``) is greedy;
    * ``top_p``: nucleus sampling, the smallest set of tokens whose probabilities reach ``top_p``;
    * ``top_k``: only the ``k`` likeliest tokens (None or 0: all, as vLLM's -1);
    * ``min_p``: drop tokens whose probability is below ``min_p`` times the likeliest one's;
    * ``repetition_penalty``: transformers' (CTRL's) penalty on every token of the prompt and answer so far,
      > 1 discourages repeats; it applies to greedy decoding too;
    * ``seed``: the request's own random stream (None: drawn from torch's global generator).
    """

    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    @classmethod
    def checked(
        cls, temperature: Any = 0.0, top_p: Any = None, top_k: Any = None, min_p: Any = None,
        repetition_penalty: Any = None, seed: Any = None,
    ) -> Sampling:  # fmt: skip
        """Every dial checked (a ``TypeError``/``ValueError`` naming the argument), then the sampling."""
        validation.number("temperature", temperature, minimum=0.0)
        if top_p is not None:
            validation.number("top_p", top_p, minimum=0.0, maximum=1.0, exclusive_minimum=True)
        validation.optional_integer("seed", seed, minimum=0, maximum=2**63 - 1)
        validation.sampling_extras(top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty)
        return cls(temperature, top_p, top_k, min_p, repetition_penalty, seed)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_SAMPLING_TEMPERATURE

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty is not None and self.repetition_penalty != 1.0

    def generator(self, device: torch.device) -> torch.Generator | None:
        """A fresh random stream for one request (None when greedy: nothing is drawn)."""
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)))
        return torch.Generator(device=device).manual_seed(seed)


def penalise_(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty, in place on one row: seen tokens' logits divided by ``penalty``
    where positive, multiplied where negative."""
    if history.numel() == 0:
        return logits
    seen = history.to(logits.device).unique()
    picked = logits[seen]
    logits[seen] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits


def pick(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None, history: torch.Tensor | None = None
) -> int:
    """The next token of one row: ``logits`` is ``(vocab,)`` float32 and may be changed in place;
    ``history`` holds the prompt and answer tokens so far (for the repetition penalty)."""
    if sampling.penalised and history is not None:
        penalise_(logits, history, float(sampling.repetition_penalty))
    if sampling.greedy:
        return int(logits.argmax())
    scores = logits / sampling.temperature
    if sampling.top_k:
        k = min(int(sampling.top_k), scores.shape[-1])
        kth = torch.topk(scores, k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    probs = torch.softmax(scores, -1)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(0) - sorted_p > sampling.top_p
        probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
    if sampling.min_p:
        probs = probs.masked_fill(probs < sampling.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))


class SamplingProcessor:
    """:func:`pick` as the last logits processor of a greedy ``model.generate`` call.

    transformers' own sampler would use its own order and defaults; handing it one finite score per
    row (the token :func:`pick` chose) makes its argmax our choice, so the single path samples exactly
    as the batcher does."""

    def __init__(self, sampling: Sampling, generators: Sequence[torch.Generator | None]):
        self.sampling, self.generators = sampling, list(generators)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = torch.full_like(scores, -math.inf)
        for row in range(scores.shape[0]):
            logits = scores[row].float().clone()
            token = pick(logits, self.sampling, self.generators[row], input_ids[row])
            out[row, token] = 0.0
        return out
