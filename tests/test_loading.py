"""Loading models: missing paths and hub ids fail with what to do; ``device_map`` reaches transformers."""

from __future__ import annotations

import pytest
import transformers

from selfextend_llm.loading import ModelNotFoundError, load_pretrained


def test_unknown_model_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_pretrained(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_pretrained(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="GGUF file"):
        load_pretrained(gguf_file=str(tmp_path / "x.gguf"))


def test_unknown_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        load_pretrained("no-such-org/no-such-model-xyz")


def test_device_map_is_passed_to_transformers(monkeypatch):
    """``load(device_map=...)`` places the model through ``from_pretrained`` instead of ``.to(device)``."""

    import selfextend_llm

    seen = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def recording(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recording)
    model = selfextend_llm.load(device_map={"": "cpu"})
    assert seen and seen[-1]["device_map"] == {"": "cpu"} and "tp_plan" not in seen[-1]
    assert str(model.device) == "cpu"
    assert model.complete("The capital of France is", max_new_tokens=2).completion_tokens >= 1
