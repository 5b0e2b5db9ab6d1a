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


def test_leftovers_of_killed_loads_are_removed_and_live_ones_kept(tmp_path):
    import os
    import subprocess

    from selfextend_llm.loading import remove_stale_temporaries

    dead = subprocess.Popen(["true"])
    dead.wait()
    stem = "Model.Q4_1-0123456789abcdef"
    gone = tmp_path / f"{stem}.tmp-{dead.pid}-x1y2"  # a first load killed mid-write
    gone.mkdir()
    (gone / "model.safetensors").write_bytes(b"\0" * 1000)
    mine = tmp_path / f"{stem}.tmp-{os.getpid()}-abcd"  # this process's own write in progress
    mine.mkdir()
    live = subprocess.Popen(["sleep", "30"])
    try:
        other = tmp_path / f"{stem}.tmp-{live.pid}-efgh"  # another process still writing
        other.mkdir()
        blocks_tmp = tmp_path / f"{stem}.blocks.safetensors.{dead.pid}.tmp"
        blocks_tmp.write_bytes(b"\0")
        finished = tmp_path / stem
        finished.mkdir()
        (finished / "config.json").write_text("{}")
        assert remove_stale_temporaries(tmp_path, f"{stem}.blocks.safetensors") == [blocks_tmp]
        blocks_tmp.write_bytes(b"\0")
        assert sorted(remove_stale_temporaries(tmp_path, stem)) == sorted([gone, blocks_tmp])
        assert mine.is_dir() and other.is_dir() and finished.is_dir()
    finally:
        live.kill()


def test_a_truncated_blocks_cache_is_rebuilt_not_fatal(tmp_path, default_model):
    from selfextend_llm.hf.quantized import attach
    from selfextend_llm.loading import blocks_cache, default_gguf_path

    gguf = default_gguf_path()
    cached = blocks_cache(gguf)
    if not cached.is_file():
        pytest.skip("the default model was loaded without quantised blocks here")
    cut = tmp_path / cached.name
    cut.write_bytes(cached.read_bytes()[:5000])  # a write cut short
    lm, _, _ = load_pretrained(quantized_weights=False)
    with pytest.warns(RuntimeWarning, match="rebuilding them"):
        attached = attach(lm, gguf, cache=cut)
    assert attached.swapped and cut.stat().st_size == cached.stat().st_size
    again = attach(load_pretrained(quantized_weights=False)[0], gguf, cache=cut)  # the rebuilt file is read
    assert again.swapped == attached.swapped


@pytest.mark.slow
def test_a_damaged_dequantised_folder_is_rebuilt(tmp_path, monkeypatch, default_model):
    import shutil

    from selfextend_llm.loading import _gguf_cache_dir, default_gguf_path

    source = _gguf_cache_dir(default_gguf_path())
    monkeypatch.setenv("SELFEXTEND_LLM_CACHE", str(tmp_path))
    target = _gguf_cache_dir(default_gguf_path())
    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    with pytest.warns(RuntimeWarning, match="rebuilding it"):
        lm, tok, _ = load_pretrained(quantized_weights=False)
    assert weights.stat().st_size == (source / "model.safetensors").stat().st_size
    assert tok.decode(tok("hello there")["input_ids"]) == "hello there" and lm.config.num_hidden_layers == 30
