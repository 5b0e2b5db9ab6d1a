"""SelfExtend on a model spread over two GPUs: accelerate's device_map and transformers' tensor
parallelism (under torchrun) give the same tokens as one GPU.

Opt-in (``SELFEXTEND_MULTI_GPU_TESTS=1``) and skipped without two GPUs.  Passed on 2x H100
(2026-11-27, transformers 5.17, PyTorch 2.11).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import transformers

import selfextend_llm as se

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
    pytest.mark.skipif(os.environ.get("SELFEXTEND_MULTI_GPU_TESTS") != "1", reason="set SELFEXTEND_MULTI_GPU_TESTS=1"),
]
NEW = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(  # even vocab: tensor parallelism splits lm_head over 2 ranks
        vocab_size=98, hidden_size=256, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny-llama")
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(1, 97, (2, 150), generator=torch.Generator().manual_seed(1))


def _generate(model, ids):
    with torch.no_grad():
        return model.generate(ids.to(model.device), max_new_tokens=NEW, do_sample=False, pad_token_id=0).cpu()


@pytest.fixture(scope="module")
def one_gpu_tokens(model_dir, prompt):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to("cuda:0").eval()
    with torch.no_grad():
        plain = model(prompt.to("cuda:0")).logits[:, -1]
        se.apply(model, se.SelfExtendConfig(4, 16))
        extended = model(prompt.to("cuda:0")).logits[:, -1]
    # Random tiny models fall into the same token loop either way; their logits show the change.
    assert (plain - extended).abs().max() > 1e-2, "SelfExtend should change this model's logits past its window"
    return _generate(model, prompt)


def test_device_map_over_two_gpus_matches_one_gpu(model_dir, prompt, one_gpu_tokens):
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1}
    device_map.update({f"model.layers.{i}": 0 if i < 2 else 1 for i in range(4)})
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, device_map=device_map
    ).eval()
    assert {p.device.index for p in model.parameters()} == {0, 1}
    se.apply(model, se.SelfExtendConfig(4, 16))
    assert torch.equal(_generate(model, prompt), one_gpu_tokens)
    assert model._selfextend_settings.calls > 0


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="needs torchrun")
def test_tensor_parallel_matches_one_gpu(model_dir, prompt, one_gpu_tokens, tmp_path):
    ids_path, out_path = tmp_path / "ids.pt", tmp_path / "out.pt"
    torch.save(prompt, ids_path)
    script = Path(__file__).parent / "helpers" / "tp_generate.py"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("SELFEXTEND_TEST_DEVICE", None)
    run = subprocess.run(
        [shutil.which("torchrun"), "--nproc-per-node", "2", str(script), str(model_dir), str(ids_path), str(out_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    start = run.stderr.find("Traceback")  # the failing rank's own traceback, not torchrun's summary
    assert run.returncode == 0, run.stderr[start : start + 4000] if start >= 0 else run.stderr[-4000:]
    result = torch.load(out_path)
    assert result["calls"] > 0
    assert torch.equal(result["tokens"], one_gpu_tokens)
