"""The OpenAI wire format, apart from the handlers: one builder for chat and text completions."""

from __future__ import annotations

from selfextend_llm.server.protocol import ChatRequest, Responder


def test_whole_responses_differ_only_in_the_choice_shape():
    chat = Responder("chat", "m").whole("hi", "stop", 5, 2)
    text = Responder("text", "m").whole("hi", "length", 5, 2)
    assert chat["object"] == "chat.completion" and chat["id"].startswith("chatcmpl-")
    assert chat["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop", "logprobs": None}
    ]
    assert text["object"] == "text_completion" and text["id"].startswith("cmpl-")
    assert text["choices"] == [{"index": 0, "text": "hi", "finish_reason": "length", "logprobs": None}]
    assert chat["usage"] == text["usage"] == {
        "prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, "prompt_tokens_details": {"cached_tokens": 0},
    }  # fmt: skip
    reused = Responder("chat", "m").whole("hi", "stop", 500, 2, cached_tokens=480)
    assert reused["usage"]["prompt_tokens_details"] == {"cached_tokens": 480}


def test_chat_stream_sends_the_role_once_skips_empty_pieces_and_ends_with_usage():
    r = Responder("chat", "m", include_usage=True)
    first, empty, last = r.chunk("He", None), r.chunk("", None), r.chunk("", "stop", 3, 1)
    assert first[0]["choices"][0]["delta"] == {"content": "He", "role": "assistant"}
    assert first[0]["object"] == "chat.completion.chunk"
    assert empty == []
    assert last[0]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert last[1]["choices"] == [] and last[1]["usage"]["total_tokens"] == 4
    assert len({p["id"] for p in first + last}) == 1  # one id for the whole stream


def test_text_stream_without_usage():
    r = Responder("text", "m")
    assert r.chunk("", None) == []
    (end,) = r.chunk("", "length", 3, 1)
    assert end["choices"][0]["finish_reason"] == "length" and "usage" not in end


def test_include_usage_reads_stream_options():
    req = ChatRequest(model="m", messages=[{"role": "user", "content": "x"}], stream_options={"include_usage": True})
    assert req.include_usage
    assert not ChatRequest(model="m", messages=[{"role": "user", "content": "x"}]).include_usage
