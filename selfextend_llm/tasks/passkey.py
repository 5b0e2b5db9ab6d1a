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


def chat_passkey_messages(document: str, *, system_role: bool = True) -> list[dict[str, str]]:
    """The chat messages that ask for the pass key in ``document``, the way a whole-document chain does.

    The instruction is a system turn where the template takes one, else the start of the user turn
    (Gemma's templates refuse a system role).
    """
    question = f"{document}\n\n{CHAT_QUESTION}"
    if system_role:
        return [{"role": "system", "content": CHAT_INSTRUCTION}, {"role": "user", "content": question}]
    return [{"role": "user", "content": f"{CHAT_INSTRUCTION}\n\n{question}"}]
