"""The pass-key retrieval task: one number hidden at a chosen depth in repetitive filler.

Seeded and reproducible: the same (seed, length, depth) always gives the same prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n\n"
)
QUESTION = "What is the pass key? The pass key is"
#: The chat form, as whole-document chains ask: an instruction, then the document and the question in one user turn.
CHAT_INSTRUCTION = "Answer the question using the document."
CHAT_QUESTION = "What is the pass key?"


@dataclass(frozen=True)
class PasskeyPrompt:
    text: str
    passkey: str
    depth: float


def make_passkey_document(n_tokens: int, depth: float, seed: int, count_tokens) -> tuple[str, str]:
    """(document, passkey): filler of about ``n_tokens`` tokens with the key at ``depth`` (0..1)."""
    rng = random.Random(seed)
    passkey = str(rng.randint(10_000, 99_999))
    needle = f"The pass key is {passkey}. Remember it. {passkey} is the pass key. "
    per = max(1, count_tokens(FILLER * 10) // 10)
    reps = max(1, (n_tokens - count_tokens(INTRO + needle + QUESTION)) // per)
    before = round(reps * depth)
    doc = INTRO + FILLER * before + needle + FILLER * (reps - before)
    return doc, passkey


def passkey_prompt(n_tokens: int, depth: float, seed: int, count_tokens) -> PasskeyPrompt:
    """A raw completion prompt whose answer is the 5-digit pass key."""
    doc, key = make_passkey_document(n_tokens, depth, seed, count_tokens)
    return PasskeyPrompt(doc + "\n" + QUESTION, key, depth)


def chat_passkey_messages(document: str) -> list[dict[str, str]]:
    """The user turn that asks for the pass key in ``document``, the way a whole-document chain does.

    The instruction (:data:`CHAT_INSTRUCTION`) is added by the model's own
    :meth:`~selfextend_llm.model.SelfExtendModel.with_instruction`, which knows whether its template
    takes a system turn (Gemma's refuse one).
    """
    return [{"role": "user", "content": f"{document}\n\n{CHAT_QUESTION}"}]
