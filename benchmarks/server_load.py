"""Many clients at once: one-at-a-time against continuous batching, in the same run, every answer checked.

Each request is a pass-key prompt of its own (a 5-digit key hidden in filler text) asking for
``--new-tokens`` tokens greedily.  Every answer must equal that prompt's answer alone (nothing lost,
nothing mixed between requests) and is also checked for its key.  For each client count the same
requests run twice: with ``max_batch=1`` (one at a time, what the server did before) and batched.
The "long" scenario adds one long prompt beside the short ones: the short requests' p99 shows
whether one long prefill holds them hostage (chunked prefill keeps them moving).

``--via http`` drives the real server (OpenAI client over loopback, half of the requests streamed);
``--via direct`` submits to the batcher in-process (the same engine, for machines without the
``[server]`` extra, e.g. the GPU machines here).  Prints a table, writes ``--out`` (JSON).

    python benchmarks/server_load.py --clients 1 8 32 --requests 64      # CPU, ~15 minutes
    python benchmarks/server_load.py --via direct --clients 1 8 32 --long-tokens 16384   # GPU
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import selfextend_llm
from selfextend_llm.engine.scheduler import ContinuousBatcher
from selfextend_llm.engine.threads import in_passing_thread
from selfextend_llm.generation import cache_bucket
from selfextend_llm.tasks.passkey import passkey_prompt


def percentile(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def run(model, requests: list[dict], clients: int, max_batch: int, via: str, new_tokens: int) -> dict:
    """Send ``requests`` from ``clients`` threads; latency per request, answers, wall time.

    The prefix cache starts empty: what one mode computed never speeds up the next."""
    model.prefix_cache.clear()
    if via == "http":
        import openai

        from selfextend_llm.server import BackgroundServer, create_app

        app = create_app(model, max_batch=max_batch, max_queue=4096, request_timeout=None)
        server = BackgroundServer(app)
        url = server.__enter__()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=3600)

        def ask(i: int) -> str:
            kw = dict(model=model.model_name, prompt=requests[i]["prompt"], max_tokens=new_tokens, temperature=0)
            if i % 2:
                return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
            return client.completions.create(**kw).choices[0].text

        close = lambda: (app.state.batcher.close(), server.__exit__(None, None, None))  # noqa: E731
    else:
        batcher = ContinuousBatcher(model, max_batch=max_batch, max_queue=4096)

        def ask(i: int) -> str:
            return batcher.submit(requests[i]["prompt"], max_new_tokens=new_tokens).result().text

        close = batcher.close

    def timed(i: int) -> tuple[int, float, str]:
        start = time.perf_counter()
        text = ask(i)
        return i, time.perf_counter() - start, text

    start = time.perf_counter()
    try:
        with futures.ThreadPoolExecutor(clients) as pool:
            done = list(pool.map(timed, range(len(requests))))
    finally:
        close()
    return {"wall_s": time.perf_counter() - start, "done": done}


def summarise(result: dict, requests: list[dict], expected: list[str], new_tokens: int) -> dict:
    done = result["done"]
    short = [lat for i, lat, _ in done if requests[i]["kind"] == "short"]
    return {
        "requests": len(requests),
        "answered": len(done),
        "same_as_alone": sum(text == expected[i] for i, _, text in done),
        "keys_found": sum(requests[i]["key"] in text for i, _, text in done),
        "req_per_s": len(done) / result["wall_s"],
        "tokens_per_s": len(done) * new_tokens / result["wall_s"],
        "p50_s": percentile([lat for _, lat, _ in done], 50),
        "p99_s": percentile([lat for _, lat, _ in done], 99),
        "short_p99_s": percentile(short, 99),
        "wall_s": result["wall_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=64, help="short requests per client count")
    ap.add_argument("--short-tokens", type=int, nargs=2, default=[200, 600], help="range of short prompt lengths")
    ap.add_argument("--long-tokens", type=int, default=16384, help="the one long prompt of the 'long' scenario")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--via", choices=["http", "direct"], default="http")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-prefix-cache", action="store_true", help="every prompt computed whole (no reuse)")
    modes = ["one_at_a_time", "batched"]
    ap.add_argument("--modes", nargs="+", choices=modes, default=modes,
                    help="server modes per scenario (the baseline is always the fast path alone)")  # fmt: skip
    args = ap.parse_args()
    model = selfextend_llm.load()
    model.prefix_cache.max_bytes = 0 if args.no_prefix_cache else model.prefix_cache.max_bytes
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86'})"
    lo, hi = args.short_tokens
    count = model.count_tokens

    def make(n: int, kind: str, seed: int) -> dict:
        p = passkey_prompt(n, depth=(seed % 7) / 7, seed=seed, count_tokens=count)
        return {"prompt": p.text, "key": p.passkey, "kind": kind, "tokens": count(p.text)}

    shorts = [make(lo + (hi - lo) * i // max(1, args.requests - 1), "short", i) for i in range(args.requests)]
    scenarios = {f"{c} clients": (c, shorts) for c in args.clients}
    if args.long_tokens:
        top = max(args.clients)
        mixed = [make(args.long_tokens, "long", 10_000)] + shorts[: max(8, top)]
        scenarios[f"{top} clients + one {args.long_tokens // 1024}k prompt"] = (top, mixed)
    # Answers alone, for the exactness check (greedy: one right answer per prompt).
    # Timed on the short prompts: what the server did before batching (the single-sequence fast path,
    # one request after another; on a GPU compiled with CUDA graphs), minus HTTP.
    # In a passing thread, as a server's process would: the main thread never computes, so the batcher's
    # thread keeps the CPUs' OpenMP pools to itself (selfextend_llm/engine/threads.py says why it matters).
    alone: dict[str, str] = {}

    def answers_alone() -> float:
        # Compile / warm up outside the timing: one prompt per static-cache bucket, so the baseline is the
        # fast path's steady state (on a GPU each new bucket compiles for seconds), not its compilation.
        buckets = {}
        for r in shorts:
            buckets.setdefault(cache_bucket(r["tokens"] + args.new_tokens), r)
        for r in buckets.values():
            model.complete(r["prompt"], max_new_tokens=args.new_tokens)
        print(f"warmed {len(buckets)} cache buckets: {model.describe()['fast_generation']}", flush=True)
        started = time.perf_counter()
        for r in shorts:
            alone[r["prompt"]] = model.complete(r["prompt"], max_new_tokens=args.new_tokens).text
        rps = len(shorts) / (time.perf_counter() - started)
        for _, reqs in scenarios.values():
            for r in reqs:
                if r["prompt"] not in alone:
                    alone[r["prompt"]] = model.complete(r["prompt"], max_new_tokens=args.new_tokens).text
        return rps

    fast_alone_rps = in_passing_thread(answers_alone)
    print(f"fast path, one after another: {fast_alone_rps:.2f} req/s", flush=True)
    rows = []
    for name, (clients, reqs) in scenarios.items():
        expected = [alone[r["prompt"]] for r in reqs]
        row = {"scenario": name, "clients": clients}
        for mode, max_batch in (("one_at_a_time", 1), ("batched", 32)):
            if mode not in args.modes:
                continue
            row[mode] = summarise(run(model, reqs, clients, max_batch, args.via, args.new_tokens), reqs, expected,
                                  args.new_tokens)  # fmt: skip
            print(name, mode, json.dumps({k: round(v, 3) for k, v in row[mode].items()}), flush=True)
        if "one_at_a_time" in row and "batched" in row:
            row["throughput_ratio"] = row["batched"]["req_per_s"] / row["one_at_a_time"]["req_per_s"]
        if "batched" in row:
            row["ratio_vs_fast_path"] = row["batched"]["req_per_s"] / fast_alone_rps
        rows.append(row)

    head = "| scenario | requests | same as alone (1-at-a-time / batched) | keys found | req/s 1-at-a-time | req/s batched | ratio | ratio vs fast path | p50 s (1 / b) | p99 s (1 / b) | short p99 s (1 / b) |"  # noqa: E501
    print(f"\n{device}, {model.model_name}, {args.new_tokens} new tokens, via {args.via}\n")
    print(head)
    print("|" + "---|" * 11)
    blank = dict.fromkeys(["requests", "same_as_alone", "keys_found", "req_per_s", "p50_s", "p99_s", "short_p99_s"])
    fmt = lambda v, spec="": "-" if v is None else format(v, spec)  # noqa: E731
    ratio = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    for r in rows:
        a, b = r.get("one_at_a_time", blank), r.get("batched", blank)
        print(
            f"| {r['scenario']} | {fmt(a['requests'] or b['requests'])} | {fmt(a['same_as_alone'])} / "
            f"{fmt(b['same_as_alone'])} | {fmt(a['keys_found'])} / {fmt(b['keys_found'])} | "
            f"{fmt(a['req_per_s'], '.2f')} | {fmt(b['req_per_s'], '.2f')} | {ratio(r.get('throughput_ratio'))} | "
            f"{ratio(r.get('ratio_vs_fast_path'))} | {fmt(a['p50_s'], '.1f')} / {fmt(b['p50_s'], '.1f')} | "
            f"{fmt(a['p99_s'], '.1f')} / {fmt(b['p99_s'], '.1f')} | "
            f"{fmt(a['short_p99_s'], '.1f')} / {fmt(b['short_p99_s'], '.1f')} |"
        )
    out = Path(args.out or f"results/server_load_{'cuda' if torch.cuda.is_available() else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "model": model.model_name, "via": args.via, "new_tokens": args.new_tokens,
            "fast_path_alone_req_per_s": fast_alone_rps}  # fmt: skip
    out.write_text(json.dumps({**meta, "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
