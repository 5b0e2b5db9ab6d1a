"""A ~12,000-token document through one stuff-style call, and the examples."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_selfextend import ChatSelfExtend, SelfExtendLLM

from selfextend_llm.tasks.documents import make_fact_document

EXAMPLES = Path(__file__).resolve().parents[4] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CallCounter(BaseCallbackHandler):
    def __init__(self) -> None:
        self.calls = 0

    def on_chat_model_start(self, *args, **kwargs) -> None:
        self.calls += 1

    def on_llm_start(self, *args, **kwargs) -> None:
        self.calls += 1


def test_profile_advertises_extended_window():
    llm = ChatSelfExtend()
    assert llm.profile["max_input_tokens"] == llm.selfextend_model.context_window == 32768
    # SmolLM2's template renders no tools: the prompted format makes them work all the same
    assert llm.profile["tool_calling"] is True and llm.selfextend_model.tool_format == "prompted"


def test_forced_tool_call_on_the_embedded_default_is_valid_on_every_path():
    """No scripting: the 135M default calls the named tool with schema-valid arguments (a grammar holds it)."""
    from langchain_core.tools import tool

    @tool
    def read_file(path: str, max_lines: int) -> str:
        """Read a whole text file."""
        return path

    @tool
    def word_count(text: str) -> int:
        """Count the words of a text."""
        return len(text.split())

    bound = ChatSelfExtend(max_tokens=60).bind_tools([read_file, word_count], tool_choice="read_file")
    message = bound.invoke("Read the file notes.txt, 10 lines.")
    (call,) = message.tool_calls
    assert call["name"] == "read_file" and isinstance(call["args"]["path"], str)
    assert isinstance(call["args"]["max_lines"], int) and message.response_metadata["finish_reason"] == "tool_calls"
    merged = None
    for chunk in bound.stream("Read the file notes.txt, 10 lines."):
        assert "<tool_call>" not in str(chunk.content)
        merged = chunk if merged is None else merged + chunk
    assert merged.tool_calls[0]["name"] == "read_file" and merged.tool_calls[0]["args"] == call["args"]
    anyone = ChatSelfExtend(max_tokens=60).bind_tools([read_file, word_count], tool_choice="any")
    assert anyone.invoke("How many words are in 'a b c'?").tool_calls[0]["name"] in ("read_file", "word_count")


def test_same_arguments_share_one_model():
    assert ChatSelfExtend().selfextend_model is ChatSelfExtend(temperature=0.5).selfextend_model
    assert SelfExtendLLM().selfextend_model is ChatSelfExtend().selfextend_model


def test_token_counts_use_model_tokenizer():
    llm = ChatSelfExtend()
    tok = llm.selfextend_model.tokenizer
    assert llm.get_token_ids("hello world") == tok("hello world")["input_ids"]
    assert llm.get_num_tokens_from_messages([("human", "hi")]) > llm.get_num_tokens("hi")


def test_prompt_past_window_fails_before_generation():
    llm = ChatSelfExtend()
    counter = CallCounter()
    with pytest.raises(ValueError, match="longer than the context window"):
        llm.invoke("word " * 33_000, config={"callbacks": [counter]})


def test_whole_document_chain_one_call():
    example = load_example("langchain_whole_document_qa")
    llm = ChatSelfExtend(max_tokens=16)
    document, question, answer = make_fact_document(12_000, llm.get_num_tokens, seed=7)
    assert llm.get_num_tokens(document) > 11_000
    counter = CallCounter()
    reply = example.build_chain(llm).invoke(
        {"document": document, "question": question}, config={"callbacks": [counter]}
    )
    assert counter.calls == 1
    assert answer in reply


def test_long_file_tool(tmp_path):
    example = load_example("langchain_long_file_tool")
    document, question, answer = make_fact_document(3_000, ChatSelfExtend().get_num_tokens, seed=3)
    path = tmp_path / "minutes.txt"
    path.write_text(document)
    assert answer in example.read_long_file.invoke({"path": str(path), "question": question})


def test_drop_in_pipeline():
    example = load_example("langchain_drop_in")
    reply = example.build_pipeline(example.make_llm()).invoke({"text": "Good morning"})
    assert isinstance(reply, str) and reply.strip()


def test_completion_llm_stop_and_stream():
    llm = SelfExtendLLM(max_tokens=20)
    text = llm.invoke("One, two, three, four, five,", stop=[" seven"])
    assert "seven" not in text
    assert "".join(llm.stream("One, two, three, four, five,", stop=[" seven"])) == text


async def test_async_batch_matches_sequential():
    llm = ChatSelfExtend(max_tokens=6)
    prompts = ["Name a colour.", "Name a fruit."]
    sequential = [llm.invoke(p).content for p in prompts]
    assert [m.content for m in await llm.abatch(prompts)] == sequential
    assert [m.content for m in llm.batch(prompts)] == sequential


def test_summarization_middleware_sees_extended_window():
    """LangChain's SummarizationMiddleware reads profile['max_input_tokens'] for fractional triggers."""
    middleware = pytest.importorskip("langchain.agents.middleware")
    llm = ChatSelfExtend()
    summarizer = middleware.SummarizationMiddleware(model=llm, trigger=("fraction", 0.8))
    assert summarizer._get_profile_limits() == 32768
    # a 12k-token conversation is far below 80% of the extended window: nothing to summarise
    messages = [("human", "word " * 12_000)]
    from langchain_core.messages import convert_to_messages

    n = llm.get_num_tokens_from_messages(convert_to_messages(messages))
    assert 0.8 * 8192 < n < 0.8 * 32768  # would trigger on the plain 8k window, not on the extended one


def test_batch_and_abatch_share_decode_steps_and_match_single_calls():
    """``batch()`` runs its calls concurrently; they join one continuously batched generation (exact per row)."""
    import asyncio

    chat = ChatSelfExtend(max_tokens=6, temperature=0)
    prompts = ["Name a colour.", "Name a fruit.", "Name a country.", "Name an animal."]
    alone = [chat.invoke(p).content for p in prompts]
    assert [m.content for m in chat.batch(prompts, config={"max_concurrency": 4})] == alone
    assert [m.content for m in asyncio.run(chat.abatch(prompts))] == alone
    assert chat.selfextend_model._batcher is not None  # concurrent calls went through the batcher
    text = SelfExtendLLM(max_tokens=6, temperature=0)
    completions = ["The capital of France is", "1, 2, 3,", "Roses are"]
    assert text.batch(completions) == [text.invoke(p) for p in completions]


def _scripted(monkeypatch, chat: ChatSelfExtend, text: str) -> None:
    """The embedded template renders no tools: script the model's answer, keep everything else real."""
    from selfextend_llm.model import StreamChunk

    model = chat.selfextend_model
    monkeypatch.setattr(type(model), "supports_tools", property(lambda self: True))

    def stream_shared(prompt, **params):
        yield from (StreamChunk(text[i : i + 7]) for i in range(0, len(text), 7))
        yield StreamChunk("", "stop", 12, 9)

    monkeypatch.setattr(model, "stream_shared", stream_shared)


def test_streamed_tool_calls_arrive_as_tool_call_chunks(monkeypatch):
    """LangGraph's stream_mode="messages" and astream_events route through _stream: the calls must survive."""
    from langchain_core.tools import tool

    @tool
    def read_file(path: str) -> str:
        """Read a whole file."""
        return path

    chat = ChatSelfExtend(max_tokens=50, temperature=0)
    _scripted(
        monkeypatch, chat, 'Checking. <tool_call>{"name": "read_file", "arguments": {"path": "a.txt"}}</tool_call>'
    )
    bound = chat.bind_tools([read_file])
    chunks = list(bound.stream("What is in a.txt?"))
    assert all("<tool_call>" not in str(c.content) for c in chunks)
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c
    assert merged.tool_calls[0]["name"] == "read_file" and merged.tool_calls[0]["args"] == {"path": "a.txt"}
    assert merged.content == "Checking." and merged.response_metadata["finish_reason"] == "tool_calls"
    streaming = ChatSelfExtend(max_tokens=50, temperature=0, streaming=True).bind_tools([read_file])
    assert streaming.invoke("What is in a.txt?").tool_calls[0]["args"] == {"path": "a.txt"}


def test_unparseable_tool_calls_land_in_invalid_tool_calls(monkeypatch):
    from langchain_core.tools import tool

    @tool
    def read_file(path: str) -> str:
        """Read a whole file."""
        return path

    chat = ChatSelfExtend(max_tokens=50, temperature=0, streaming=True)
    _scripted(monkeypatch, chat, '<tool_call>{"name": "read_file", "arguments": {"path": </tool_call>')
    message = chat.bind_tools([read_file]).invoke("What is in a.txt?")
    assert message.tool_calls == [] and len(message.invalid_tool_calls) == 1
    with pytest.raises(ValueError, match="not among the tools"):
        chat.bind_tools([read_file], tool_choice="delete_everything").invoke("hi")


def test_structured_output_is_valid_by_construction():
    """The 135M default writes schema-valid JSON once decoding is constrained (it did not when only asked)."""
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: int
        coastal: bool

    for seed in range(3):  # sampled: the constraint, not luck
        chat = ChatSelfExtend(max_tokens=60, temperature=0.9, seed=seed)
        assert isinstance(chat.with_structured_output(City).invoke("Name a city."), City)


def test_agent_example_reads_a_whole_long_file_past_the_window(tmp_path):
    """create_agent on the embedded default: a forced first call (grammar), the tool reads ~10k tokens (past the
    trained 8k) in one SelfExtend call, and the agent's answer carries the pass key hidden in the file."""
    from langchain_core.messages import AIMessage, ToolMessage

    from selfextend_llm.tasks.passkey import make_passkey_document

    example = load_example("langchain_agent_long_file")
    llm = ChatSelfExtend(max_tokens=32)
    doc, key = make_passkey_document(10_000, 0.4, 7, llm.get_num_tokens)
    assert llm.get_num_tokens(doc) > llm.selfextend_model.pretrained_context
    path = tmp_path / "long.txt"
    path.write_text(doc)
    messages = example.ask(path, "What is the pass key?", llm)["messages"]
    calls = [c for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
    assert [c["name"] for c in calls] == ["read_whole_file"]
    (result,) = [m for m in messages if isinstance(m, ToolMessage)]
    assert key in result.content and messages[-1] is result  # return_direct: the tool's answer ends the run
