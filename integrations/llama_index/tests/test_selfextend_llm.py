"""SelfExtendLLM in LlamaIndex: whole-document packing, streaming, chat, async, stop, examples."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from llama_index.core import Settings
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
from llama_index.llms.selfextend import SelfExtendLLM

from selfextend_llm.tasks.documents import make_fact_document

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def llm():
    return SelfExtendLLM(max_new_tokens=16)


def llm_calls(engine_llm, run) -> int:
    debug = LlamaDebugHandler()
    engine_llm.callback_manager = CallbackManager([debug])
    Settings.callback_manager = engine_llm.callback_manager
    run()
    return len(debug.get_event_pairs(CBEventType.LLM))


def test_metadata_reports_extended_window(llm):
    meta = llm.metadata
    # a FunctionCallingLLM on every chat model: the default calls tools in the prompted format
    assert meta.context_window == 32768 and meta.is_chat_model and meta.is_function_calling_model
    assert meta.model_name == "SmolLM2-135M-Instruct"
    assert llm.tokenizer("hello world") == llm.selfextend_model.tokenizer("hello world")["input_ids"]


def test_compact_query_is_one_call_with_selfextend_and_several_without(llm):
    example = load_example("llamaindex_whole_document_qa")
    text, question, answer = make_fact_document(12_000, lambda s: len(llm.tokenizer(s)), seed=11)
    answers = []
    calls = llm_calls(llm, lambda: answers.append(str(example.build_query_engine(llm, text).query(question))))
    assert calls == 1
    assert answer in answers[0]
    plain_window = SelfExtendLLM(selfextend_model=llm.selfextend_model, max_new_tokens=4, context_window_override=8192)
    calls = llm_calls(plain_window, lambda: example.build_query_engine(plain_window, text).query(question))
    assert calls > 1


def test_stream_complete_applies_prompt_formatting(llm):
    formatted = SelfExtendLLM(
        selfextend_model=llm.selfextend_model,
        max_new_tokens=12,
        completion_to_prompt=lambda p: p + " Answer in one word.",
    )
    assert (
        "".join(r.delta for r in formatted.stream_complete("What is the capital of France?"))
        == formatted.complete("What is the capital of France?").text
    )


def test_chat_stream_chat_and_stop(llm):
    msgs = [ChatMessage(role="user", content="Write one sentence about the sea.")]
    whole = llm.chat(msgs, max_new_tokens=40).message.content
    stop = whole[len(whole) // 2 : len(whole) // 2 + 6]
    cut = llm.chat(msgs, max_new_tokens=40, stop=[stop]).message.content
    assert cut == whole[: whole.index(stop)]
    streamed = list(llm.stream_chat(msgs, max_new_tokens=40, stop=[stop]))
    assert streamed[-1].message.content == cut


async def test_async_forms(llm):
    msgs = [ChatMessage(role="user", content="Say hi.")]
    assert (await llm.achat(msgs)).message.content == llm.chat(msgs).message.content
    assert (await llm.acomplete("Say hi.")).text == llm.complete("Say hi.").text
    pieces = [r.delta async for r in await llm.astream_complete("Say hi.")]
    assert "".join(pieces) == llm.complete("Say hi.").text


def test_prompt_past_window_raises_before_generation(llm):
    with pytest.raises(ValueError, match="longer than the context window"):
        llm.complete("word " * 33_000)


def test_drop_in_example():
    example = load_example("llamaindex_drop_in")
    example.configure()
    assert isinstance(Settings.llm, SelfExtendLLM)
    assert example.existing_pipeline("When does the museum open?").strip()


def test_fast_generation_opt_in_and_out_reach_the_model():
    from langchain_selfextend import ChatSelfExtend

    assert SelfExtendLLM(fast_generation=True)._model.fast.enabled
    assert not SelfExtendLLM(fast_generation=False)._model.fast.enabled
    assert ChatSelfExtend(fast_generation=True).selfextend_model.fast.enabled
    assert not ChatSelfExtend(fast_generation=False).selfextend_model.fast.enabled


def test_concurrent_async_calls_share_decode_steps(llm):
    """``asyncio.gather`` over ``acomplete`` (what LlamaIndex's async pipelines do): one batched generation,
    each answer the same as its call alone."""
    import asyncio

    prompts = ["The capital of France is", "1, 2, 3,", "Roses are red,", "Once upon a time"]
    alone = [llm.complete(p).text for p in prompts]

    async def together():
        return await asyncio.gather(*(llm.acomplete(p) for p in prompts))

    assert [r.text for r in asyncio.run(together())] == alone


def test_usage_under_raw_usage_whole_and_streamed_and_sampling_fields(llm):
    """TokenCountingHandler reads ``raw["usage"]``: there in whole and streamed responses."""
    from llama_index.core.callbacks import TokenCountingHandler

    whole = llm.complete("The capital of France is")
    assert whole.raw["usage"]["completion_tokens"] == whole.raw["completion_tokens"] > 0
    last = list(llm.stream_chat([ChatMessage(role="user", content="Name a colour.")]))[-1]
    assert last.raw["usage"]["total_tokens"] == last.raw["prompt_tokens"] + last.raw["completion_tokens"]
    counter = TokenCountingHandler()
    counted = SelfExtendLLM(max_new_tokens=8, callback_manager=CallbackManager([counter]))
    counted.complete("The capital of France is")
    assert counter.completion_llm_token_count == counted.complete("The capital of France is").raw["completion_tokens"]
    sampled = SelfExtendLLM(max_new_tokens=8, temperature=0.9, top_p=0.9, seed=5)
    assert sampled.complete("Once upon a time").text == sampled.complete("Once upon a time").text  # seeded


def _weather(city: str, days: int) -> str:
    """Get the weather forecast for a city."""
    return f"Sunny in {city} for {days} days."


def test_function_calling_llm_forced_call_predict_and_call_and_history(llm):
    """FunctionCallingLLM on the 135M default (prompted format): a forced call is valid and runs."""
    from llama_index.core.tools import FunctionTool

    tool = FunctionTool.from_defaults(fn=_weather)
    big = SelfExtendLLM(max_new_tokens=60)
    assert big.metadata.is_function_calling_model
    response = big.chat_with_tools([tool], user_msg="Weather in Rome for 2 days?", tool_required=True)
    (selection,) = big.get_tool_calls_from_response(response)
    assert selection.tool_name == "_weather" and isinstance(selection.tool_kwargs["city"], str)
    assert isinstance(selection.tool_kwargs["days"], int)
    assert "<tool_call>" not in (response.message.content or "")
    streamed = list(big.stream_chat_with_tools([tool], user_msg="Weather in Rome for 2 days?", tool_required=True))
    assert big.get_tool_calls_from_response(streamed[-1])[0].tool_kwargs == selection.tool_kwargs
    result = big.predict_and_call([tool], user_msg="Weather in Rome for 2 days?", tool_required=True)
    assert result.response.startswith("Sunny in ") and result.sources[0].tool_name == "_weather"
    # the call and its result as history: rendered in the prompted format for the next turn
    history = [
        ChatMessage(role="user", content="Weather in Rome for 2 days?"),
        response.message,
        ChatMessage(role="tool", content="Sunny.", additional_kwargs={"tool_call_id": selection.tool_id}),
    ]
    prompt = big.selfextend_model.tokenizer.decode(
        big.selfextend_model.encode(big._chat_prompt(history), tools=[tool.metadata.to_openai_tool()])
    )
    assert "<tool_response>\nSunny.\n</tool_response>" in prompt and '"name": "_weather"' in prompt
    with pytest.raises(ValueError, match="expected at least one tool call"):
        big.get_tool_calls_from_response(big.chat([ChatMessage(role="user", content="hi")]))


def test_structured_predict_is_constrained(llm):
    from llama_index.core.prompts import PromptTemplate
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: int
        coastal: bool

    big = SelfExtendLLM(max_new_tokens=60)
    city = big.structured_predict(City, PromptTemplate("Name a city in {country}."), country="Italy")
    assert isinstance(city, City)
    import asyncio

    assert isinstance(asyncio.run(big.astructured_predict(City, PromptTemplate("Name a city."))), City)


async def test_function_agent_runs_on_the_default(llm):
    """LlamaIndex's FunctionAgent drives SelfExtendLLM's tool API to a final answer."""
    from llama_index.core.agent.workflow import FunctionAgent

    agent = FunctionAgent(tools=[_weather], llm=SelfExtendLLM(max_new_tokens=40), system_prompt="Be brief.")
    result = await agent.run(user_msg="Say hello.")
    assert str(result).strip()
