"""Test helpers: tiny random-weight models of each RoPE family, and the float64 reference as an
attention implementation (every path is compared against it, in isolation and inside models)."""

from __future__ import annotations

import torch
import transformers

from selfextend_llm.hf.attention import dense_causal, plain_attention, selfextend_mask
from selfextend_llm.kernels.blocks import key_positions
from selfextend_llm.kernels.static_decode import is_key_row
from selfextend_llm.reference import reference_selfextend

TRAINED = 64  # tiny trained window so that short sequences already exercise grouping

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)

FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, num_key_value_heads=2, max_position_embeddings=TRAINED),
    "mistral": lambda: transformers.MistralConfig(
        **COMMON, num_key_value_heads=2, max_position_embeddings=TRAINED, sliding_window=None
    ),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, num_key_value_heads=2, max_position_embeddings=TRAINED),
    "qwen3": lambda: transformers.Qwen3Config(
        **COMMON, num_key_value_heads=2, head_dim=16, max_position_embeddings=TRAINED
    ),
    "phi3": lambda: transformers.Phi3Config(
        **COMMON,
        num_key_value_heads=2,
        max_position_embeddings=TRAINED,
        original_max_position_embeddings=TRAINED,
        pad_token_id=0,
    ),
    "gemma2": lambda: transformers.Gemma2Config(
        **COMMON, num_key_value_heads=2, head_dim=16, max_position_embeddings=TRAINED, sliding_window=16
    ),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 3},
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=TRAINED,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
    # partial rotary (half the head dim rotates)
    "phi": lambda: transformers.PhiConfig(**COMMON, max_position_embeddings=TRAINED, partial_rotary_factor=0.5),
    # interleaved channel pairs
    "cohere": lambda: transformers.CohereConfig(**COMMON, num_key_value_heads=2, max_position_embeddings=TRAINED),
}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A two- or three-layer random model of ``family`` trained (nominally) on ``TRAINED`` tokens."""
    torch.manual_seed(seed)
    config = FAMILIES[family]()
    impl = "eager" if family == "gemma2" else "sdpa"  # Gemma 2 softcaps logits, which SDPA cannot
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()


def reference_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The two-score-matrix formula as an attention implementation, for model-level comparisons."""
    state = getattr(module, "_selfextend", None)
    if state is None:
        return plain_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    q_len, n = query.shape[2], key.shape[2]
    dense = attention_mask
    if attention_mask is None or is_key_row(attention_mask, q_len):
        dense = dense_causal(attention_mask, q_len, n, query.device)
    if dense is None:
        dense = (torch.arange(n)[None, :] <= torch.arange(n - q_len, n)[:, None])[None, None]
    # the newest visible slot of the last query row is that query's own slot
    end = int(dense[:, 0, -1].nonzero()[:, -1].max()) + 1
    start = end - q_len
    positions = kwargs["position_ids"].expand(query.shape[0], -1)
    k_pos, _ = key_positions(positions, start, n)
    cfg = state.settings.config
    out = reference_selfextend(
        query,
        key,
        value,
        query_positions=positions,
        key_positions=k_pos,
        group_size=cfg.group_size,
        neighbor_window=cfg.neighbor_window,
        inv_freq=state.inv_freq,
        layout=state.layout,
        scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
        mask=dense,
        softcap=kwargs.get("softcap"),
    )
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def register_reference() -> None:
    """Make ``attn_implementation="selfextend_reference"`` (the float64 formula) known to transformers."""
    transformers.AttentionInterface.register("selfextend_reference", reference_attention_forward)
    transformers.masking_utils.AttentionMaskInterface.register("selfextend_reference", selfextend_mask)


def tiny_served_model(tokenizer, *, layers: int, hidden: int, context_window: int, **model_options):
    """A random Llama with a real tokenizer, trained (nominally) on 128 tokens, SelfExtend G=4 W=32, as a
    :class:`SelfExtendModel`: the serving paths (server, batcher) end to end at test speed."""
    from selfextend_llm import apply
    from selfextend_llm.config import SelfExtendConfig
    from selfextend_llm.model import SelfExtendModel

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden + 32, num_hidden_layers=layers,
        num_attention_heads=hidden // 16, num_key_value_heads=max(1, hidden // 32), max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    lm = transformers.LlamaForCausalLM(config).eval()
    lm.generation_config.eos_token_id = tokenizer.eos_token_id
    apply(lm, SelfExtendConfig(4, 32))
    return SelfExtendModel(
        lm, tokenizer, config=SelfExtendConfig(4, 32), context_window=context_window, name="tiny", **model_options
    )
