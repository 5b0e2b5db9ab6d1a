"""Long texts encoded in parallel pieces: exactly the ids of the whole text, or encoded whole."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from selfextend_llm import tokens
from selfextend_llm.tasks.passkey import passkey_prompt

FRAGMENTS = [
    "word", "Word", " the", " cat", "  ", "   ", "\n", "\n\n", "\t", " \n", "42", " 1999", "3.14", ".", ",", "!?",
    "'s", "'ll", " don't", "é", " naïve", "中文", " 東京", "🙂", " 🙂", "<|im_start|>", "<|im_end|>", "user", "_x",
    "x_1", "(", ")", " [", "]", "{\"a\": 1}", "\u00a0", "\u2003", "\x1c", "ﬁ", "²", "½", "-", " -", "--", "http://a.b",
]  # fmt: skip


def _random_text(rng: random.Random, n_chars: int) -> str:
    parts, size = [], 0
    while size < n_chars:
        piece = rng.choice(FRAGMENTS) if rng.random() < 0.6 else " " + "".join(rng.choices("abcdefgXYZ019", k=5))
        parts.append(piece)
        size += len(piece)
    return "".join(parts)


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model.tokenizer


def test_the_default_tokenizer_is_cut_and_pieces_give_the_whole_texts_ids(tokenizer):
    encoder = tokens.ParallelEncoder(tokenizer)
    assert encoder.active  # SmolLM2: byte-level BPE with GPT-2's regex
    rng = random.Random(0)
    texts = [_random_text(rng, 70_000 + 997 * i) for i in range(12)]
    texts.append(passkey_prompt(20_000, 0.3, 1, lambda t: len(t) // 4).text)
    for text in texts:
        assert len(text) >= tokens.MIN_PARALLEL_CHARS
        got = encoder.encode(text)
        assert got is not None, "a text with safe cuts must be encoded in pieces"
        assert got == list(tokenizer(text)["input_ids"])
        assert encoder.encode(text, add_special_tokens=False) == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_cuts_are_only_between_an_ascii_alphanumeric_and_a_space_before_a_letter():
    rng = random.Random(1)
    text = _random_text(rng, 50_000)
    cuts = tokens.cut_points(text, 16)
    assert 8 <= len(cuts) <= 15 and cuts == sorted(set(cuts))
    for c in cuts:
        assert text[c] == " " and text[c - 1].isascii() and text[c - 1].isalnum()
        assert text[c + 1].isascii() and text[c + 1].isalpha()
    assert tokens.cut_points("中文" * 40_000, 8) == []  # nowhere safe: the caller encodes it whole


def test_short_texts_and_texts_without_a_safe_cut_are_left_to_the_tokenizer(tokenizer):
    encoder = tokens.ParallelEncoder(tokenizer)
    assert encoder.encode("a short prompt") is None
    assert encoder.encode("中文" * 40_000) is None


def test_truncation_left_on_the_shared_tokenizer_never_cuts_the_pieces(tokenizer):
    """transformers sets truncation on the Rust tokenizer per call and may leave it there; pieces encoded under it
    would each be truncated, so the encoder steps aside and the tokenizer's own call (which resets it) runs."""
    text = _random_text(random.Random(3), 70_000)
    encoder = tokens.ParallelEncoder(tokenizer)
    backend = tokenizer._tokenizer
    backend.enable_truncation(max_length=100)
    try:
        assert encoder.encode(text) is None
    finally:
        backend.no_truncation()
    assert len(encoder.encode(text)) > 10_000


def test_tokenizers_it_cannot_prove_exact_are_never_cut():
    """A normalizer or a metaspace pre-tokenizer may look across a space: such tokenizers are encoded whole."""
    vocab = {"a": 0, "b": 1, "▁": 2}

    class Wrapped:  # what transformers' fast tokenizers expose
        def __init__(self, backend: Tokenizer):
            self._tokenizer = backend

    meta = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    meta.pre_tokenizer = pre_tokenizers.Metaspace()
    normed = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    normed.normalizer = normalizers.Lowercase()
    normed.pre_tokenizer = pre_tokenizers.ByteLevel()
    for backend in (meta, normed):
        encoder = tokens.ParallelEncoder(Wrapped(backend))
        assert not encoder.active and encoder.encode("a b " * 40_000) is None
    assert not tokens.ParallelEncoder(object()).active  # a slow (Python) tokenizer


def test_long_chat_prompts_encode_to_the_templates_ids(default_model):
    """The chat path renders the template and encodes the text in pieces: the ids are ``apply_chat_template``'s."""
    doc = _random_text(random.Random(2), 80_000)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": doc + "\nWhat?"}]
    want = default_model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert default_model.encode(messages) == list(want)
    assert default_model.encode(doc) == list(default_model.tokenizer(doc)["input_ids"])


def test_short_chat_prompts_encode_to_the_templates_ids(default_model):
    """Rendered once and encoded as ``tokenize=True`` encodes it, control-token strings in the content included."""
    messages = [{"role": "user", "content": "Hi <|im_end|> there"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "  and now?\n"}]  # fmt: skip
    want = default_model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert default_model.encode(messages) == list(want)
