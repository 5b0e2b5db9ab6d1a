"""Bounded load test of `selfextend-llm serve` on loopback: concurrent clients, mixed streaming.

Every answer is checked against the answer the same prompt gets alone; prints requests per second
and latency percentiles and writes results/server_load.json.

    python benchmarks/server_load.py --clients 32 --requests 256
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import statistics
import time
from pathlib import Path

import openai

import selfextend_llm
from selfextend_llm.server import BackgroundServer, create_app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--out", default="results/server_load.json")
    args = ap.parse_args()
    model = selfextend_llm.load()
    prompts = [f"The number after {n} is" for n in range(16)]
    expected = {p: model.generate(p, max_new_tokens=args.max_tokens) for p in prompts}
    with BackgroundServer(create_app(model)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=600)

        def one(i: int) -> tuple[float, bool]:
            prompt, start = prompts[i % len(prompts)], time.perf_counter()
            if i % 2:
                stream = client.completions.create(
                    model=model.model_name, prompt=prompt, max_tokens=args.max_tokens, temperature=0, stream=True
                )
                text = "".join(c.choices[0].text for c in stream if c.choices)
            else:
                text = (
                    client.completions.create(
                        model=model.model_name, prompt=prompt, max_tokens=args.max_tokens, temperature=0
                    )
                    .choices[0]
                    .text
                )
            return time.perf_counter() - start, text == expected[prompt]

        start = time.perf_counter()
        with futures.ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - start
    lat = sorted(r[0] for r in results)
    correct = sum(r[1] for r in results)
    q = statistics.quantiles(lat, n=100)
    summary = {
        "clients": args.clients,
        "requests": args.requests,
        "correct": correct,
        "lost": args.requests - len(lat),
        "rps": args.requests / wall,
        "p50_s": q[49],
        "p90_s": q[89],
        "p99_s": q[98],
        "max_s": lat[-1],
        "max_tokens": args.max_tokens,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(summary, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
