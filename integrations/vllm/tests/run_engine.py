"""Run one vLLM engine over a job and print its results as JSON (the tests call this in a subprocess).

vLLM's engine starts worker processes, so it runs from a script with a ``__main__`` guard, one engine per
process (two engines in one test process would fight over memory and workers).

    python run_engine.py JOB.json   ->   {"startup_s": ..., "batches": [[{"text", "token_ids"}, ...], ...]}

A job: ``{"engine": {...vllm.LLM kwargs...} | null, "plugin": {engine_args kwargs} | null,
"batches": [{"prompts": [[token ids], ...], "max_tokens": 16}]}``.
"""

from __future__ import annotations

import json
import sys
import time


def main(path: str) -> None:
    from vllm import LLM, SamplingParams

    job = json.loads(open(path, encoding="utf-8").read())
    if job.get("plugin") is not None:
        from vllm_selfextend import engine_args

        plugin = dict(job["plugin"])
        kwargs = engine_args(plugin.pop("model"), **plugin)
    else:
        kwargs = job["engine"]
    started = time.perf_counter()
    llm = LLM(**kwargs)
    startup = time.perf_counter() - started
    results = []
    for batch in job["batches"]:
        params = SamplingParams(max_tokens=batch["max_tokens"], temperature=0.0)
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": ids} for ids in batch["prompts"]], params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        results.append(
            {
                "seconds": seconds,
                "outputs": [{"text": o.outputs[0].text, "token_ids": list(o.outputs[0].token_ids)} for o in outs],
            }
        )
    print("RESULT " + json.dumps({"startup_s": startup, "batches": results}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
