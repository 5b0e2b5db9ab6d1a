"""Main job: the embedded SmolLM2 (trained on 8,192 tokens) reads a ~12,000-token document whole.

SelfExtend finds the pass key hidden in it; the plain model, given the same prompt, does not.
Run with `make demo`.
"""

from __future__ import annotations

import time

import torch

import selfextend_llm
from selfextend_llm.tasks.passkey import passkey_prompt


def plain_answer(model: selfextend_llm.SelfExtendModel, prompt: str, max_new_tokens: int = 16) -> str:
    """What the same weights say without SelfExtend (no window check: we want to see it fail)."""
    selfextend_llm.remove(model.model)
    try:
        ids = torch.tensor([model.encode(prompt)], device=model.device)
        with torch.inference_mode():
            out = model.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        return model.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    finally:
        selfextend_llm.apply(model.model, model.config)


def main(n_tokens: int = 12_000) -> None:
    model = selfextend_llm.load()
    print(model)
    prompt = passkey_prompt(n_tokens, depth=0.35, seed=2024, count_tokens=model.count_tokens)
    print(
        f"document: {model.count_tokens(prompt.text)} tokens, trained window {model.pretrained_context}; "
        f"hidden pass key {prompt.passkey}"
    )
    start = time.perf_counter()
    print("SelfExtend: ", end="", flush=True)
    for piece in model.stream(prompt.text, max_new_tokens=16, stop=["\n"]):
        print(piece, end="", flush=True)
    print(f"   [{time.perf_counter() - start:.0f} s]")
    start = time.perf_counter()
    print(f"plain model: {plain_answer(model, prompt.text)!r}   [{time.perf_counter() - start:.0f} s]")


if __name__ == "__main__":
    main()
