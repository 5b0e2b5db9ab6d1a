"""The answer's text token by token: pieces that join to the whole answer's decode, at a bounded cost per token."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from selfextend_llm.engine.detokenize import CONTEXT_TOKENS, IncrementalDetokenizer


class _Counting:
    """A tokenizer that counts the ids it is asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids, skip_special_tokens=True):
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _stream(tokenizer, ids):
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(t) for t in ids]
    pieces.append(detok.finish())
    return pieces, detok


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model.tokenizer


def test_pieces_join_to_the_whole_decode_of_random_ids_and_of_real_text(tokenizer):
    rng = random.Random(0)
    vocab = len(tokenizer)
    texts = ["Hello, world! naïve café 東京 🙂🙂 done.", "  spaced\n\n  out\t", "<|im_start|>user\nhi<|im_end|>"]
    cases = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    cases += [[rng.randrange(vocab) for _ in range(rng.randrange(1, 120))] for _ in range(60)]
    for ids in cases:
        pieces, detok = _stream(tokenizer, ids)
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(pieces) == whole == detok.text


def test_a_character_split_over_byte_tokens_shows_only_when_complete(tokenizer):
    ids = tokenizer("a🙂", add_special_tokens=False)["input_ids"]
    assert len(ids) >= 3  # the emoji is several byte-level tokens
    pieces, _ = _stream(tokenizer, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[0] == "a" and "".join(pieces) == "a🙂"
    assert [p for p in pieces if p][-1].endswith("🙂")


def test_an_answer_that_ends_inside_a_character_keeps_the_whole_decodes_replacement_at_finish(tokenizer):
    ids = tokenizer("x🙂", add_special_tokens=False)["input_ids"][:-1]
    detok = IncrementalDetokenizer(tokenizer)
    streamed = "".join(detok.push(t) for t in ids)
    assert "\ufffd" not in streamed
    assert streamed + detok.finish() == tokenizer.decode(ids) and detok.text.endswith("\ufffd")


def test_the_cost_per_token_does_not_grow_with_the_answer(tokenizer):
    counting = _Counting(tokenizer)
    ids = tokenizer("word " * 2000, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(counting)
    for t in ids:
        detok.push(t)
    assert detok.text == "word " * 2000
    assert counting.decoded <= 2 * (CONTEXT_TOKENS + 2) * len(ids)  # decoding whole each step: ~n^2 / 2


def test_a_metaspace_tokenizer_keeps_its_spaces_between_pieces():
    """SentencePiece-style decoding drops the first piece's leading space: decoding a window from the same first
    id twice makes the drop act on both, so words keep their spaces."""
    vocab = {"<unk>": 0, "▁the": 1, "▁cat": 2, "s": 3, "▁": 4, "at": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    ids = [1, 2, 3, 4, 5, 1, 2]
    pieces, _ = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == "the cats at the cat"
