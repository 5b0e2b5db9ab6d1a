"""Test session set-up: the device, Triton's interpreter where there is no GPU, the reference
attention registered, and the real default model as a fixture (helpers live in ``tests/helpers``)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here: fail fast instead of retrying
import pytest
import torch

if os.environ.get("SELFEXTEND_TEST_DEVICE", "cpu") == "cpu" and not torch.cuda.is_available():
    # Without a GPU, the Triton kernels run (slowly, exactly) in Triton's interpreter; this must be
    # set before the kernels are defined.  Never on a GPU machine: interpreted kernels on CUDA
    # tensors are so slow that the multi-GPU tests looked hung.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.helpers import register_reference

if os.environ.get("SELFEXTEND_TEST_DEVICE"):  # e.g. "cuda": run the tiny-model suites on a GPU
    torch.set_default_device(os.environ["SELFEXTEND_TEST_DEVICE"])


def _fix_triton_interpreter() -> None:
    """Triton 3.6's interpreter turns 1-element loop bounds into ints with ``int(array)``, which
    NumPy 2 refuses for arrays of shape (1,); read the element instead."""
    try:
        import triton.runtime.interpreter as interpreter
    except ImportError:
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_triton_interpreter()

register_reference()


@pytest.fixture(scope="session")
def default_model():
    """The embedded SmolLM2 default with SelfExtend (loaded once per test session)."""
    import selfextend_llm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return selfextend_llm.load()


@pytest.fixture
def validated_default(default_model, monkeypatch):
    """The default model with a table validated on the held-out split: reading well to 16k, not at 24k.

    Held-out scores are set by hand (the shipped table's own change when it is re-tuned), so the plumbing
    from the table to what users read (describe, /v1/models, LangChain's profile, LlamaIndex's metadata)
    is checked against a known answer.
    """
    import dataclasses

    from selfextend_llm.tuning import TunedTable

    table = default_model.plan.table

    def scored(entries):
        out = []
        for e in entries:
            ok = 1.0 if e.upto <= 16384 else 0.4
            held = {"heldout/prose-key": ok, "heldout/filler-key": 1.0, "heldout/prose-key-chat": ok}
            out.append(dataclasses.replace(e, held_out=held if e.upto > table.pretrained_context else {}))
        return out

    validated = TunedTable(
        table.model, table.pretrained_context, scored(table.entries), dict(table.measured), table.source,
        scored(table.chat_entries),
    )  # fmt: skip
    monkeypatch.setattr(default_model, "plan", dataclasses.replace(default_model.plan, table=validated))
    return default_model


@pytest.fixture
def tiny_folder(tmp_path, default_model):
    """A random Llama nominally trained on 128 tokens, with the default's tokenizer, saved as a model folder
    (a model that is not the embedded default, fast enough to tune end to end)."""
    import transformers

    torch.manual_seed(0)
    tok = default_model.tokenizer
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    folder = tmp_path / "tiny-llama"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
