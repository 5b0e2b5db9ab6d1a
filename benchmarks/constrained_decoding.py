"""Constrained decoding on the embedded default: schema validity, and the per-token cost of each grammar library.

For each schema (nested objects, enums, arrays, numbers, ``json_object``) the embedded model answers
a chat request three ways: free (the prompt asks for JSON), and constrained through
``response_format`` (llguidance, what the project ships since this measurement).  Every answer is checked with
``jsonschema``-style validation (``pydantic``'s ``TypeAdapter`` on the schema is not general, so
a small validator below covers the keywords used).  Then the constrained token sequences are
replayed through xgrammar and llguidance, timing "compute the mask, apply it to the logits, accept
the token" per token, which is what each library adds to a decode step.

    python benchmarks/constrained_decoding.py            # CPU; writes results/constrained_decoding_cpu.json
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

import selfextend_llm

SCHEMAS: dict[str, dict] = {
    "person (strings, integer, enum, array)": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "colour": {"enum": ["red", "green", "blue"]},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        },
        "required": ["name", "age", "colour", "tags"],
        "additionalProperties": False,
    },
    "order (nested objects, numbers, boolean)": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "customer": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "vip": {"type": "boolean"}},
                "required": ["name", "vip"],
                "additionalProperties": False,
            },
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"sku": {"type": "string"}, "price": {"type": "number"}},
                    "required": ["sku", "price"],
                    "additionalProperties": False,
                },
                "minItems": 1,
                "maxItems": 2,
            },
        },
        "required": ["id", "customer", "items"],
        "additionalProperties": False,
    },
    "answer (enum and number)": {
        "type": "object",
        "properties": {"verdict": {"enum": ["yes", "no", "unsure"]}, "confidence": {"type": "number"}},
        "required": ["verdict", "confidence"],
        "additionalProperties": False,
    },
    "any JSON object": {},
}
QUESTIONS = [
    "Describe a customer called Ann as JSON.",
    "Make up an order for two items as JSON.",
    "Is the sky green? Reply in JSON.",
    "Give me some JSON about a cat.",
]


def valid(value: object, schema: dict) -> bool:
    """The JSON-schema keywords used above (type, properties, required, additionalProperties, enum,
    items, minItems, maxItems, minimum, maximum)."""
    if "enum" in schema and value not in schema["enum"]:
        return False
    kind = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "boolean": bool}
    if kind in types and not isinstance(value, types[kind]):
        return False
    if kind == "integer" and (isinstance(value, bool) or not isinstance(value, int)):
        return False
    if kind == "number" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return False
    if kind in ("integer", "number"):
        if value < schema.get("minimum", -float("inf")) or value > schema.get("maximum", float("inf")):
            return False
    if kind == "object":
        props = schema.get("properties", {})
        if any(k not in value for k in schema.get("required", [])):
            return False
        if schema.get("additionalProperties") is False and set(value) - set(props):
            return False
        return all(valid(v, props[k]) for k, v in value.items() if k in props)
    if kind == "array":
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 10**9):
            return False
        return all(valid(v, schema.get("items", {})) for v in value)
    return True


def parses(text: str, schema: dict) -> bool:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and valid(value, schema or {"type": "object"})


def replay_costs(tokenizer, schema: dict, tokens: list[int], vocab: int, device: str = "cpu") -> dict[str, float]:
    """Median microseconds per token: mask + apply + accept, for xgrammar and llguidance.

    On a GPU the logits live there: the mask is filled on the host, copied over and applied there, as a
    GPU decode step would do it (and the step synchronises before the next token, as sampling does)."""
    import llguidance
    import llguidance.hf
    import llguidance.torch
    import xgrammar as xgr

    logits = torch.randn(1, vocab, device=device)
    sync = torch.cuda.synchronize if logits.is_cuda else (lambda: None)
    out = {}
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info)
    compiled = compiler.compile_json_schema(json.dumps(schema or {"type": "object"}))
    matcher, mask = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, vocab)
    times = []
    for t in tokens:
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        xgr.apply_token_bitmask_inplace(logits, mask.to(logits.device, non_blocking=True))
        sync()
        matcher.accept_token(t)
        times.append(time.perf_counter() - start)
    out["xgrammar_us"] = statistics.median(times) * 1e6

    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(schema or {"type": "object"}), defaults={"whitespace_flexible": True}
    )
    matcher = llguidance.LLMatcher(lltok, grammar)
    mask = llguidance.torch.allocate_token_bitmask(1, vocab)
    times = []
    for t in tokens:
        start = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        llguidance.torch.apply_token_bitmask_inplace(logits, mask.to(logits.device, non_blocking=True))
        sync()
        matcher.consume_token(t)
        times.append(time.perf_counter() - start)
        if matcher.is_error():  # the replay must follow the same text, or the timing means nothing
            raise RuntimeError(f"llguidance refused the constrained output: {matcher.get_error()}")
    out["llguidance_us"] = statistics.median(times) * 1e6
    return out


def main() -> None:
    model = selfextend_llm.load()
    vocab = model.model.get_output_embeddings().weight.shape[0]
    rows = []
    for (name, schema), question in zip(SCHEMAS.items(), QUESTIONS, strict=True):
        fmt = {"type": "json_schema", "json_schema": {"schema": schema}} if schema else {"type": "json_object"}
        hint = "Answer with one JSON object" + (f" matching this JSON schema: {json.dumps(schema)}" if schema else "")
        messages = model.with_instruction([{"role": "user", "content": question}], hint + ".")
        row = {"schema": name, "free_valid": 0, "constrained_valid": 0, "constrained_cut": 0, "n": 0}
        step_free, step_constrained, replay = [], [], []
        for seed in range(5):
            kw = dict(max_new_tokens=200, temperature=0.7, seed=seed)
            start = time.perf_counter()
            free = model.complete(messages, **kw)
            step_free.append((time.perf_counter() - start) / max(1, free.completion_tokens))
            start = time.perf_counter()
            done = model.complete(messages, response_format=fmt, **kw)
            step_constrained.append((time.perf_counter() - start) / max(1, done.completion_tokens))
            row["n"] += 1
            row["free_valid"] += parses(free.text, schema)
            row["constrained_valid"] += parses(done.text, schema)
            row["constrained_cut"] += done.finish_reason == "length"  # max_new_tokens ran out mid-document
            replay.append(replay_costs(model.tokenizer, schema, model.tokenize(done.text), vocab))
        row["ms_per_token_free"] = statistics.median(step_free) * 1e3
        row["ms_per_token_constrained"] = statistics.median(step_constrained) * 1e3
        row["xgrammar_us_per_token"] = statistics.median(r["xgrammar_us"] for r in replay)
        row["llguidance_us_per_token"] = statistics.median(r["llguidance_us"] for r in replay)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{platform.processor() or 'CPU'}, {model.model_name}, temperature 0.7, 5 seeds per schema\n")
    print("| schema | valid, prompt only | valid, constrained | cut by max_new_tokens | ms/token free | "
          "ms/token constrained | xgrammar us/token | llguidance us/token |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['schema']} | {r['free_valid']}/{r['n']} | {r['constrained_valid']}/{r['n']} | "
            f"{r['constrained_cut']} | "
            f"{r['ms_per_token_free']:.1f} | {r['ms_per_token_constrained']:.1f} | "
            f"{r['xgrammar_us_per_token']:.0f} | {r['llguidance_us_per_token']:.0f} |"
        )
    out = Path("results/constrained_decoding_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
