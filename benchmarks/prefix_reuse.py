"""A second question about one long document: how much of the first question's time it costs.

Every way a user asks runs twice over its own document (so each first question starts cold): the
library's ``complete()``, LangChain's ``ChatSelfExtend.invoke``, and the OpenAI-compatible server
(``openai`` client over loopback, in-process uvicorn).  A last row saves the document's cache to disk
(``save_prompt_cache``), loads a *new* model, reads the file (``load_prompt_cache``) and asks there: a
later process skips the prefill.  The second answer is checked against the same question asked with
reuse off (``prefix_cache_bytes=0``): reuse must not change a token.  Prints a table, writes ``--out``.

Model work runs in passing threads (the server's batcher thread then keeps the CPU's OpenMP pools to
itself, as in a server process: :mod:`selfextend_llm.engine.threads`).

    python benchmarks/prefix_reuse.py                      # CPU, 10k-token documents, ~10 minutes
    python benchmarks/prefix_reuse.py --tokens 2000        # a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import selfextend_llm
from selfextend_llm.engine.threads import in_passing_thread

FACTS = [
    ("the harbour master", "Ilse Varga"), ("the lighthouse keeper", "Tomas Reyne"), ("the ferry pilot", "Ana Kowal"),
    ("the customs officer", "Bram Oster"), ("the net mender", "Yusuf Adeyemi"), ("the tide clerk", "Mira Solberg"),
]  # fmt: skip
FILLER = (
    "The boats came in one after another, their hulls grey with salt, and the gulls followed them to the quay. "
    "On the hill the bells of the old church rang the hour while carts rattled down to the fish market. "
)


def document(tokens: int, seed: int, count) -> tuple[str, str, str]:
    """A long text with one fact near its start: (document, question 1, question 2)."""
    role, name = FACTS[seed % len(FACTS)]
    fact = f"In the year {1700 + seed * 13}, {role} of the town was {name}. "
    per = max(1, count(FILLER * 8) // 8)
    title = f"Town records, volume {seed + 1}: {name}'s year. "  # documents share no prefix with each other
    text = title + FILLER * 3 + fact + FILLER * max(1, (tokens - count(fact)) // per - 3)
    return text, f"Who was {role}?", f"In which year was {name} {role}?"


def ask_messages(doc: str, question: str) -> list[dict]:
    return [{"role": "user", "content": f"{doc}\n\nAnswer from the text above. {question}"}]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=10_000, help="document length in tokens")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--ways", nargs="+", default=["complete", "langchain", "server", "disk"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model = in_passing_thread(selfextend_llm.load)
    fresh = in_passing_thread(selfextend_llm.load, prefix_cache_bytes=0)  # the answers without reuse
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86'})"
    n = args.new_tokens
    rows = []

    def record(way: str, first: tuple, second: tuple, q2: list[dict]) -> None:
        (t1, (text1, cached1)), (t2, (text2, cached2)) = first, second
        want = in_passing_thread(fresh.complete, q2, max_new_tokens=n).text
        row = {
            "way": way, "first_s": t1, "second_s": t2, "ratio": t2 / t1, "first_cached": cached1,
            "second_cached": cached2, "prompt_tokens": model.count_tokens(q2), "same_as_without_reuse": text2 == want,
            "answer_1": text1, "answer_2": text2,
        }  # fmt: skip
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    def direct(messages):
        done = model.complete(messages, max_new_tokens=n)
        return done.text, done.cached_tokens

    in_passing_thread(direct, [{"role": "user", "content": "Hello"}])  # warm-up outside the timings

    def one(way: str, seed: int) -> None:
        doc, q1, q2 = document(args.tokens, seed, model.count_tokens)
        m1, m2 = ask_messages(doc, q1), ask_messages(doc, q2)
        if way == "complete":
            record(way, in_passing_thread(timed, lambda: direct(m1)), in_passing_thread(timed, lambda: direct(m2)), m2)
        elif way == "langchain":
            from langchain_selfextend import ChatSelfExtend

            llm = ChatSelfExtend(client=model, max_tokens=n)

            def chain(messages):
                reply = llm.invoke([(m["role"], m["content"]) for m in messages])
                return reply.content, reply.usage_metadata["input_token_details"]["cache_read"]

            record(way, in_passing_thread(timed, lambda: chain(m1)), in_passing_thread(timed, lambda: chain(m2)), m2)
        elif way == "server":
            import openai

            from selfextend_llm.server import BackgroundServer, create_app

            app = create_app(model)
            with BackgroundServer(app) as url:
                client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=3600)

                def http(messages):
                    r = client.chat.completions.create(
                        model=model.model_name, messages=messages, max_tokens=n, temperature=0
                    )
                    return r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens

                record(way, timed(lambda: http(m1)), timed(lambda: http(m2)), m2)
                app.state.batcher.close()
        elif way == "disk":
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "doc.kv"
                first = in_passing_thread(timed, lambda: direct(m1))
                model.save_prompt_cache(m1, path)  # kept from the first question: nothing is computed again
                later = in_passing_thread(selfextend_llm.load)  # stands in for a new process
                read_s, _ = timed(lambda: later.load_prompt_cache(path))

                def from_disk():
                    done = later.complete(m2, max_new_tokens=n)
                    return done.text, done.cached_tokens

                second = in_passing_thread(timed, from_disk)
                record("disk (new model)", first, (second[0] + read_s, second[1]), m2)
                rows[-1]["file_mb"] = path.stat().st_size / 2**20
        else:
            raise SystemExit(f"unknown way {way!r}; choose from complete, langchain, server, disk")

    for seed, way in enumerate(args.ways):
        one(way, seed)

    print(f"\n{device}, {model.model_name}, documents of ~{args.tokens} tokens, {n} new tokens\n")
    print("| way | prompt tokens | first question s | second question s | second / first | cached tokens | "
          "same answer as without reuse |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['way']} | {r['prompt_tokens']} | {r['first_s']:.1f} | {r['second_s']:.2f} | {r['ratio']:.3f}x | "
            f"{r['second_cached']} | {'yes' if r['same_as_without_reuse'] else 'NO'} |"
        )
    out = Path(args.out or f"results/prefix_reuse_{'cuda' if torch.cuda.is_available() else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "model": model.model_name, "tokens": args.tokens, "new_tokens": n}
    out.write_text(json.dumps({**meta, "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
