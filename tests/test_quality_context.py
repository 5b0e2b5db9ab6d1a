"""How far the model was measured to read well, beside its hard window, wherever a user reads the window:
describe(), the server's model card, LangChain's profile and LlamaIndex's metadata."""

from __future__ import annotations

from fastapi.testclient import TestClient


def test_describe_separates_the_hard_window_from_the_measured_one(validated_default, default_model):
    info = validated_default.describe()
    assert info["context_window"] == 32768 and info["quality_context"] == 16384 == validated_default.quality_context
    assert info["quality"]["bar"] == 0.9 and info["quality"]["measured"][24576] == {"raw": 0.4, "chat": 0.4}
    assert 8192 not in info["quality"]["measured"]  # inside the window nothing was validated here


def test_model_card_reports_quality_context(validated_default):
    from selfextend_llm.server import create_app

    with TestClient(create_app(validated_default)) as client:
        card = client.get("/v1/models").json()["data"][0]
        one = client.get(f"/v1/models/{card['id']}").json()
    assert card["max_model_len"] == 32768 and card["quality_context"] == one["quality_context"] == 16384
    assert card["quality"]["measured"]["16384"] == {"raw": 1.0, "chat": 1.0}  # JSON keys are strings


def test_langchain_profile_and_llama_index_metadata_carry_it(validated_default):
    from langchain_selfextend import ChatSelfExtend
    from llama_index.llms.selfextend import SelfExtendLLM, SelfExtendMetadata

    chat = ChatSelfExtend(selfextend_model=validated_default)
    assert chat.profile["max_input_tokens"] == 32768 and chat.profile["quality_context"] == 16384
    meta = SelfExtendLLM(selfextend_model=validated_default).metadata
    assert isinstance(meta, SelfExtendMetadata) and (meta.context_window, meta.quality_context) == (32768, 16384)


def test_a_fixed_grouping_claims_no_measured_quality(default_model):
    import selfextend_llm

    fixed = selfextend_llm.load(group_size=4, neighbor_window=1024)
    assert fixed.quality_context is None and fixed.describe()["quality"]["measured"] == {}
