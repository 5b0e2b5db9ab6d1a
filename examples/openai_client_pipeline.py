"""An existing OpenAI-client pipeline, pointed at `selfextend-llm serve` by its base URL alone.

selfextend-llm serve --port 8000 &
OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=unused python examples/openai_client_pipeline.py report.txt
"""

from __future__ import annotations

import sys

from openai import OpenAI


def summarise(client: OpenAI, text: str, model: str = "SmolLM2-135M-Instruct") -> str:
    """Unchanged pipeline code: the whole document in one request."""
    reply = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "Answer the question using the document."},
            {"role": "user", "content": f"{text}\n\nSummarise the document in one sentence."},
        ],
        max_tokens=64,
        temperature=0,
    )
    return reply.choices[0].message.content


if __name__ == "__main__":
    print(summarise(OpenAI(), open(sys.argv[1], encoding="utf-8").read()))
