"""SelfExtend under transformers' static cache: exact, tensor-only, and compiled decode steps."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import CompileConfig, StaticCache

import selfextend_llm as se
from selfextend_llm.config import LogScale
from selfextend_llm.generation import cache_bucket
from selfextend_llm.kernels import static_decode
from selfextend_llm.reference import reference_selfextend
from selfextend_llm.rope import grouped_key_position
from tests.helpers import FAMILIES, tiny_model

SEQ = 150


def _padded_pair(first: int, second: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    a, b = torch.randint(1, 97, (1, first)), torch.randint(1, 97, (1, second))
    pad = first - second
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_static_cache_generate_equals_dynamic(family):
    """Greedy tokens under cache_implementation="static" (batch of 2, left padding) are the
    dynamic cache's, and grouping really happened (G=1 gives other tokens)."""
    model = tiny_model(family)
    ids, mask = _padded_pair(120, 93)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, attention_mask=mask)
    se.apply(model, se.SelfExtendConfig(3, 12))
    with torch.no_grad():
        dynamic = model.generate(ids, **kw)
        static = model.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(static, dynamic)


def test_static_cache_logits_step_by_step():
    """Prefill then single steps into a half-empty StaticCache: logits match a full forward."""
    model = tiny_model("qwen3")
    se.apply(model, se.SelfExtendConfig(4, 10))
    ids = torch.randint(0, 97, (1, SEQ))
    with torch.no_grad():
        full = model(ids).logits.double()
        cache = StaticCache(config=model.config, max_cache_len=256)
        out = model(ids[:, :100], past_key_values=cache, use_cache=True)
        steps = [out.logits]
        for t in range(100, SEQ):
            steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    err = (torch.cat(steps, 1).double() - full).abs().max().item()
    assert err < 2e-4, err


@pytest.mark.parametrize("strength", [1.0, 0.5, 2.0])
def test_decode_step_matches_float64_formula(strength):
    """The tensor-only step against the two-matrix formula: GQA, left padding, a position
    offset per row, slots past the end holding garbage (not zeros), log scaling at three strengths."""
    torch.manual_seed(0)
    b, h, kv, d, n_slots, end, G, W = 2, 6, 2, 16, 96, 70, 3, 9
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    key = torch.randn(b, kv, n_slots, d)
    value = torch.randn(b, kv, n_slots, d)
    query = torch.randn(b, h, 1, d)
    visible = torch.zeros(b, n_slots, dtype=torch.bool)
    visible[0, :end] = True
    visible[1, 11:end] = True  # 11 slots of left padding
    positions = torch.tensor([[end - 1], [end - 1 - 11]])
    slot_pos = torch.arange(n_slots)[None, :] - torch.tensor([[0], [11]])
    grouped = torch.randn(b, kv, n_slots, d)  # stale content past the end must not matter
    shift = grouped_key_position(slot_pos[:, : end - 1], G) - slot_pos[:, : end - 1]
    grouped[:, :, : end - 1] = se.rope.rotate(key[:, :, : end - 1], shift, inv_freq)
    out = static_decode.decode_step(
        query, key, value, visible[:, None, None, :], positions, grouped,
        group_size=G, neighbor_window=W, inv_freq=inv_freq, layout="half", scale=d**-0.5,
        log_scaling=LogScale(32, strength),
    )  # fmt: skip
    ratio = torch.log(positions.double() + 1) / torch.log(torch.tensor(32.0, dtype=torch.float64))
    factor = torch.clamp(1 + strength * (ratio - 1), min=1.0)
    assert factor.min() > 1  # both rows are past the base: the scaling is in play
    expected = reference_selfextend(
        query * factor[:, None, :, None], key, value, query_positions=positions, key_positions=slot_pos,
        group_size=G, neighbor_window=W, inv_freq=inv_freq, scale=d**-0.5, mask=visible[:, None, None, :],
    )  # fmt: skip
    assert (out.double() - expected).abs().max().item() < 1e-5
    # the step wrote the new key's grouped rotation into its slot
    new = se.rope.rotate(key[:, :, end - 1 : end], grouped_key_position(positions, G) - positions, inv_freq)
    assert torch.allclose(grouped[:, :, end - 1 : end], new, atol=1e-6)


class _Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_decode_step_allocates_no_square_tensor():
    model = tiny_model("llama")
    se.apply(model, se.SelfExtendConfig(4, 16))
    ids = torch.randint(0, 97, (1, SEQ))
    with torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=256)
        model(ids[:, :-1], past_key_values=cache, use_cache=True)
        with _Shapes() as seen:
            model(ids[:, -1:], past_key_values=cache, use_cache=True)
    big = [s for s in seen.shapes if sum(dim >= SEQ for dim in s) >= 2]
    assert seen.shapes and not big, big


@pytest.mark.parametrize(("family", "strength"), [("llama", 0.0), ("cohere", 0.0), ("llama", 0.5)])
def test_compiled_decode_fullgraph_equals_dynamic(family, strength):
    """generate() compiles its decode step with fullgraph=True (any graph break or host sync
    would fail it) and gives the dynamic cache's tokens; a second call reuses the graph; log-scaled
    queries at half strength (a constant of the graph) too.
    (Not Gemma 3: transformers' static sliding-window layers recompile at every step.)"""
    torch._dynamo.reset()
    model = tiny_model(family)
    ids, mask = _padded_pair(110, 97, seed=1)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, attention_mask=mask)
    se.apply(model, se.SelfExtendConfig(3, 12, log_scale=strength))
    compile_config = CompileConfig(fullgraph=True, dynamic=False)
    compile_config._compile_all_devices = True
    with torch.no_grad():
        dynamic = model.generate(ids, **kw)
        for _ in range(2):
            compiled = model.generate(ids, cache_implementation="static", compile_config=compile_config, **kw)
            assert torch.equal(compiled, dynamic)


def test_compiling_a_prefill_says_what_to_do():
    model = tiny_model("llama")
    se.apply(model, se.SelfExtendConfig(4, 16))
    torch._dynamo.reset()
    step = torch.compile(model, fullgraph=True)
    with torch.no_grad(), pytest.raises(Exception, match="static cache"):
        step(torch.randint(0, 97, (1, 40)))


def test_cache_buckets():
    assert cache_bucket(1) == 256
    assert cache_bucket(257) == 320
    assert cache_bucket(16384) == 16384
    assert cache_bucket(16385) == 20480
    assert cache_bucket(65536 + 128) == 81920
    for total in (300, 5000, 12345, 40000, 99999):
        size = cache_bucket(total)
        assert total <= size <= 1.25 * total + 1
    with pytest.raises(ValueError, match="total_tokens"):
        cache_bucket(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (CUDA graphs, sync debug mode)")
@pytest.mark.parametrize("strength", [0.0, 0.5])
def test_cuda_graph_decode_has_no_host_sync(strength):
    """Decode steps compiled with CUDA graphs (mode="reduce-overhead") run with the sync debug
    mode on "error", and their logits match a full forward (log-scaled queries on or off)."""
    torch._dynamo.reset()
    model = tiny_model("llama").cuda()
    se.apply(model, se.SelfExtendConfig(3, 12, log_scale=strength))
    ids = torch.randint(0, 97, (1, SEQ), device="cuda")
    with torch.no_grad():
        full = model(ids).logits.double()
        cache = StaticCache(config=model.config, max_cache_len=256)
        steps = [model(ids[:, :100], past_key_values=cache, use_cache=True).logits]
        step = torch.compile(model, fullgraph=True, mode="reduce-overhead", dynamic=False)
        for t in range(100, 110):  # compiling and recording the graph may sync
            steps.append(step(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits.clone())
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for t in range(110, SEQ):
                steps.append(step(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits.clone())
        finally:
            torch.cuda.set_sync_debug_mode("default")
    err = (torch.cat(steps, 1).double() - full).abs().max().item()
    assert err < 2e-4, err


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_log_scaled_steps_share_per_forward_tables_exactly(strength):
    """Log-scaled queries (factor > 1 past the 64-token trained window) with the per-forward
    tables shared by the layers: step-by-step decoding, on both caches, equals one full forward."""
    model = tiny_model("llama")
    se.apply(model, se.SelfExtendConfig(4, 12, log_scale=strength))
    ids = torch.randint(0, 97, (1, SEQ))
    errors = []
    with torch.no_grad():
        full = model(ids).logits.double()
        for cache in (None, StaticCache(config=model.config, max_cache_len=256)):
            out = model(ids[:, :100], past_key_values=cache, use_cache=True)
            cache, steps = out.past_key_values, [out.logits]
            for t in range(100, SEQ):
                steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
            errors.append((torch.cat(steps, 1).double() - full).abs().max().item())
    assert max(errors) < 2e-4, errors
    se.apply(model, se.SelfExtendConfig(4, 12))  # the factor really mattered, far beyond the rounding
    with torch.no_grad():
        effect = (model(ids).logits.double() - full).abs().max().item()
    assert effect > 2e-4 and effect > 20 * max(errors), (effect, errors)


def test_the_recompile_limit_drops_compiled_graphs_and_the_call_still_answers(default_model, monkeypatch):
    """Dynamo's ``FailOnRecompileLimitHit`` (the ninth shape on a GPU) is not a ``TorchDynamoException``: it
    must not escape ``complete()`` nor turn the fast path off; the graphs are dropped and the call answers
    on the dynamic cache, with the tokens the fast path gives."""
    from selfextend_llm.generation import recompile_limit_errors

    errors = recompile_limit_errors()
    assert errors and any(e.__name__ == "FailOnRecompileLimitHit" for e in errors)
    model = default_model
    if not model.fast.active:
        pytest.skip("the fast path is off here")
    prompt = "Name three colours of the sea:"
    model.prefix_cache.clear()
    want = model.complete(prompt, max_new_tokens=10)
    model.prefix_cache.clear()
    real, hits = model.model.generate, []

    def generate(*args, **kwargs):
        cache = kwargs.get(model.fast.cache_arg)
        if isinstance(cache, StaticCache) and not hits:
            hits.append(1)
            raise errors[0]("recompile limit reached (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(model.model, "generate", generate)
    resets = model.fast.compile_resets
    with pytest.warns(RuntimeWarning, match="recompile_limit"):
        got = model.complete(prompt, max_new_tokens=10)
    assert hits and got.text == want.text
    assert model.fast.compile_resets == resets + 1 and model.fast.active  # still on, for the next calls
    assert model.describe()["last_call"]["path"] == "dynamic cache"
    model.prefix_cache.clear()
    again = model.complete(prompt, max_new_tokens=10)  # the next call is back on the static cache
    assert again.text == want.text and model.describe()["last_call"]["path"].startswith("static cache")


def test_compile_scope_holds_more_shapes_than_dynamos_default_and_only_for_the_call():
    """Nine cache buckets are one workload of 2k-8k prompts: under ``compile_scope`` a fullgraph function
    compiles twelve static shapes without hitting the limit, and the user's own limit is back afterwards."""
    from selfextend_llm.generation import GRAPH_LIMIT, FastGeneration, recompile_limit_errors

    fast = FastGeneration(torch.nn.Linear(2, 2), enabled=True)
    before = torch._dynamo.config.recompile_limit
    assert before < 12 <= GRAPH_LIMIT
    torch._dynamo.reset()
    step = torch.compile(lambda x: x * 2 + 1, fullgraph=True, dynamic=False, backend="eager")
    with fast.compile_scope():
        assert torch._dynamo.config.recompile_limit == GRAPH_LIMIT
        for n in range(1, 13):
            assert torch.equal(step(torch.ones(n)), torch.full((n,), 3.0))
    assert torch._dynamo.config.recompile_limit == before
    with pytest.raises(recompile_limit_errors()):  # outside the scope dynamo's own limit still applies
        for n in range(13, 13 + before + 1):
            step(torch.ones(n))
    torch._dynamo.reset()


@pytest.mark.slow
def test_later_cache_buckets_reuse_one_compiled_graph_and_give_the_dynamic_caches_tokens():
    """The fast path's compile config lets dynamo make the cache length symbolic after the second bucket: four
    buckets compile two graphs, not four, and every call gives the dynamic cache's greedy tokens."""
    from torch._dynamo.utils import counters

    from selfextend_llm.generation import FastGeneration, cache_bucket

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model("llama")
    se.apply(model, se.SelfExtendConfig(3, 12))
    fast = FastGeneration(model, enabled=True, compile=True)
    buckets = []
    for prompt in (90, 260, 330, 400):  # buckets 256, 320, 384, 448
        ids = torch.randint(1, 97, (1, prompt), generator=torch.Generator().manual_seed(prompt))
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            want = model.generate(ids, **kw)
            extra = fast.generate_kwargs(1, prompt + 8)
            assert "compile_config" in extra
            with fast.compile_scope():
                got = model.generate(ids, **extra, **kw)
        assert torch.equal(got, want)
        buckets.append(cache_bucket(prompt + 8))
    assert len(set(buckets)) == 4
    assert counters["stats"]["unique_graphs"] <= 2, counters["stats"]
    torch._dynamo.reset()
