"""The generation engine: the parts every path shares (single calls, the batcher, the server).

* :mod:`.scheduler`: one scheduler for 1..N requests (a lone one on the single fast path, more in a batch);
  imported on its own (it needs :mod:`selfextend_llm.model`, which needs the parts below);

* :mod:`.sampling`: one sampler (temperature, top-p, top-k, min-p, repetition penalty, a seed per request);
* :mod:`.prefix_cache`: the keys and values of recent prompts, reused by calls that share their first tokens;
* :mod:`.batch_cache`: the batcher's KV cache, written in place by each decode step.
* :mod:`.detokenize`: the text of a growing answer at a cost per token that does not grow with it.
"""

from .detokenize import IncrementalDetokenizer
from .prefix_cache import PrefixCache
from .sampling import Sampling

__all__ = ["IncrementalDetokenizer", "PrefixCache", "Sampling"]
