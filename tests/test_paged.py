"""SelfExtend over a paged KV cache (vLLM's layout) against the float64 formula: random block tables, GQA,
mixed batches of prefill chunks and decode tokens, prefix-cache hits.  On a GPU the same tests run the Triton
kernels (``SELFEXTEND_TEST_DEVICE=cuda``)."""

from __future__ import annotations

import math

import pytest
import torch

from selfextend_llm.config import SelfExtendConfig
from selfextend_llm.kernels import triton as triton_kernels
from selfextend_llm.kernels.paged import gather_sequence, paged_selfextend_attention, split_kv, write_kv
from selfextend_llm.reference import reference_selfextend
from selfextend_llm.rope import rotate


def _inv_freq(d: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d)


def _device() -> torch.device:
    return torch.empty(0).device  # the suite's default device (cuda under SELFEXTEND_TEST_DEVICE=cuda)


def _batch(seed: int, seq_lens, q_lens, heads, kv_heads, d, block_size, dtype):
    """A cache with the sequences' keys scattered over shuffled blocks, and the step's packed queries."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    cpu = {"generator": g, "dtype": torch.float64, "device": "cpu"}
    dev = _device()
    inv = _inv_freq(d)
    n_blocks = sum((n + block_size - 1) // block_size for n in seq_lens) + 3
    cache = torch.zeros(n_blocks, kv_heads, block_size, 2 * d, dtype=dtype, device=dev)
    order = torch.randperm(n_blocks, generator=g, device="cpu").tolist()
    width = max((n + block_size - 1) // block_size for n in seq_lens)
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32, device="cpu")
    raw, queries = [], []
    for i, (n, q_len) in enumerate(zip(seq_lens, q_lens, strict=True)):
        blocks = [order.pop() for _ in range((n + block_size - 1) // block_size)]
        table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32, device="cpu")
        pos = torch.arange(n, device="cpu")
        k = rotate(torch.randn(1, kv_heads, n, d, **cpu), pos[None], inv)
        v = torch.randn(1, kv_heads, n, d, **cpu)
        q = rotate(torch.randn(1, heads, q_len, d, **cpu), pos[None, n - q_len :], inv)
        slots = torch.tensor([blocks[p // block_size] * block_size + p % block_size for p in range(n)], device="cpu")
        write_kv(cache, k[0].transpose(0, 1).to(dev, dtype), v[0].transpose(0, 1).to(dev, dtype), slots.to(dev))
        raw.append((q, k, v))
        queries.append(q[0].transpose(0, 1))
    starts = [0]
    for q_len in q_lens:
        starts.append(starts[-1] + q_len)
    return cache, table.to(dev), torch.cat(queries).to(dev, dtype), starts, raw, inv


def _expected(raw, seq_lens, config_for, inv, scale):
    outs = []
    for (q, k, v), n in zip(raw, seq_lens, strict=True):
        cfg = config_for(n)
        group, window = (1, n + 1) if cfg is None else (cfg.group_size, cfg.neighbor_window)
        pos = torch.arange(n, device="cpu")
        ref = reference_selfextend(
            q, k, v, query_positions=pos[None, n - q.shape[2] :], key_positions=pos[None], group_size=group,
            neighbor_window=window, inv_freq=inv, scale=scale,
        )  # fmt: skip
        outs.append(ref[0].transpose(0, 1))
    return torch.cat(outs)


def test_write_and_gather_round_trip_through_shuffled_blocks():
    cache, table, _, _, raw, _ = _batch(0, [37, 5], [1, 5], 4, 2, 16, 8, torch.float32)
    key_cache, value_cache = split_kv(cache, 16)
    for i, (_, k, v) in enumerate(raw):
        n = k.shape[2]
        torch.testing.assert_close(gather_sequence(key_cache, table[i], n).cpu().double(), k, atol=1e-6, rtol=0)
        torch.testing.assert_close(gather_sequence(value_cache, table[i], n).cpu().double(), v, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("seq_lens", "q_lens", "heads", "kv_heads", "d"),
    [
        ([300, 97, 1, 180], [1, 97, 1, 64], 4, 2, 32),  # decode, whole prompt, a 1-token prompt, a chunk
        ([520, 40], [128, 1], 6, 2, 64),  # a late prefill chunk (prefix-cache hit) beside a decode row
        ([256], [256], 2, 2, 64),  # MHA, one whole prompt
        ([300, 180, 260, 97], [1, 1, 1, 97], 4, 1, 32),  # three decode rows of one grouping: one launch
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch_decodes", [None, True])
def test_mixed_batches_match_the_float64_formula(seq_lens, q_lens, heads, kv_heads, d, dtype, batch_decodes):
    """``batch_decodes=True``: the one-token rows in one Triton launch (Triton's interpreter on the CPU)."""
    if batch_decodes and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("Triton's interpreter computes bfloat16 through NumPy, which has none; covered on the GPU")
    cache, table, query, starts, raw, inv = _batch(1, seq_lens, q_lens, heads, kv_heads, d, 16, dtype)
    scale = d**-0.5

    def config_for(n: int) -> SelfExtendConfig | None:  # per-length grouping, plain for short sequences
        return None if n < 64 else SelfExtendConfig(4 if n < 400 else 8, 32)

    out = paged_selfextend_attention(
        query, cache, block_table=table, seq_lens=seq_lens, query_start_loc=starts, config_for=config_for,
        inv_freq=inv.float().to(query.device), scale=scale, pretrained_context=128, batch_decodes=batch_decodes,
    )  # fmt: skip
    expected = _expected(raw, seq_lens, config_for, inv, scale)
    atol = 3e-2 if dtype == torch.bfloat16 else 2e-4 if query.is_cuda else 1e-5
    torch.testing.assert_close(out.cpu().double(), expected, atol=atol, rtol=0)


def test_padding_rows_and_negative_slots_are_left_alone():
    cache, table, query, starts, raw, inv = _batch(2, [40], [3], 2, 1, 16, 8, torch.float32)
    before = cache.clone()
    write_kv(cache, torch.ones(2, 1, 16, device=cache.device), torch.ones(2, 1, 16, device=cache.device),
             torch.tensor([-1, -1], device=cache.device))  # fmt: skip
    assert torch.equal(cache, before)
    padded = torch.cat([query, torch.full_like(query[:2], 7.0)])
    out = paged_selfextend_attention(
        padded, cache, block_table=table, seq_lens=[40], query_start_loc=starts,
        config_for=lambda n: SelfExtendConfig(2, 8), inv_freq=inv.float().to(query.device), scale=0.25,
        pretrained_context=32,
    )  # fmt: skip
    assert torch.equal(out[3:], torch.zeros_like(out[3:]))


def test_a_write_mixing_padding_and_real_slots_changes_only_the_real_ones():
    """On CUDA padding rows go to slot 0 and write back what is there (no host sync): nothing else moves."""
    cache, *_ = _batch(4, [40], [3], 2, 1, 16, 8, torch.float32)
    before = cache.clone()
    key = torch.full((3, 1, 16), 5.0, device=cache.device)
    value = torch.full((3, 1, 16), 6.0, device=cache.device)
    write_kv(cache, key, value, torch.tensor([-1, 8 * 3 + 5, -1], device=cache.device))
    changed = (cache != before).any(-1).nonzero().tolist()
    assert changed == [[3, 0, 5]]
    assert torch.equal(cache[3, 0, 5], torch.cat([key[1, 0], value[1, 0]]))


def test_one_step_cache_serves_every_layer_with_the_same_answer():
    """vLLM passes one dict per engine step to every layer: the decode plan is made once and reused."""
    seq_lens, q_lens = [300, 180, 260, 97], [1, 1, 1, 97]
    cache, table, query, starts, raw, inv = _batch(5, seq_lens, q_lens, 4, 1, 32, 16, torch.float32)
    if not triton_kernels.available(query.device):
        pytest.skip("the batched decode runs in Triton's interpreter or on CUDA (SELFEXTEND_TEST_DEVICE=cuda)")
    step: dict = {}
    args = dict(
        block_table=table, seq_lens=seq_lens, query_start_loc=starts, config_for=lambda n: SelfExtendConfig(4, 32),
        inv_freq=inv.float().to(query.device), scale=32**-0.5, pretrained_context=128, batch_decodes=True,
    )  # fmt: skip
    first = paged_selfextend_attention(query, cache, step_cache=step, **args)
    assert step["decode"] is not None and step["decode"][0] == [0, 1, 2]
    second = paged_selfextend_attention(query, cache, step_cache=step, **args)
    assert torch.equal(first, second)
    expected = _expected(raw, seq_lens, args["config_for"], inv, 32**-0.5)
    torch.testing.assert_close(first.cpu().double(), expected, atol=2e-4, rtol=0)


def test_decode_rows_of_one_grouping_share_one_launch(monkeypatch):
    from selfextend_llm.kernels import paged

    launches = []
    real = paged._decode_rows_together

    def spy(*args, **kwargs):
        done = real(*args, **kwargs)
        launches.append(done)
        return done

    monkeypatch.setattr(paged, "_decode_rows_together", spy)
    cache, table, query, starts, raw, inv = _batch(3, [300, 180, 260, 97], [1, 1, 1, 97], 4, 1, 32, 16, torch.float32)
    if not triton_kernels.available(query.device):  # CPU tensors on a GPU machine: no interpreter there
        pytest.skip("the launch runs in Triton's interpreter or on CUDA (SELFEXTEND_TEST_DEVICE=cuda)")
    paged.paged_selfextend_attention(
        query, cache, block_table=table, seq_lens=[300, 180, 260, 97], query_start_loc=starts,
        config_for=lambda n: SelfExtendConfig(4, 32), inv_freq=inv.float().to(query.device), scale=32**-0.5,
        pretrained_context=128, batch_decodes=True,
    )  # fmt: skip
    assert launches == [{0, 1, 2}]


@pytest.mark.parametrize("batch_decodes", [None, True])
def test_log_scaled_queries_at_half_strength_over_the_paged_cache(batch_decodes):
    """vLLM's path with a strength from a table (half of LongLM's scaling) past a trained window of 128:
    decode rows (one launch with ``batch_decodes``) and a prompt, each the formula on its scaled queries."""
    seq_lens, q_lens, d = [300, 180, 260, 97], [1, 1, 1, 97], 32
    cache, table, query, starts, raw, inv = _batch(2, seq_lens, q_lens, 4, 1, d, 16, torch.float32)
    cfg = SelfExtendConfig(4, 32, log_scale=0.5)
    out = paged_selfextend_attention(
        query, cache, block_table=table, seq_lens=seq_lens, query_start_loc=starts, config_for=lambda n: cfg,
        inv_freq=inv.float().to(query.device), scale=d**-0.5, pretrained_context=128, batch_decodes=batch_decodes,
    )  # fmt: skip
    scaled = []
    for (q, k, v), n in zip(raw, seq_lens, strict=True):
        pos = torch.arange(n - q.shape[2], n, dtype=torch.float64, device="cpu")  # beside the CPU reference
        factor = torch.clamp(1 + 0.5 * (torch.log(pos + 1) / math.log(128) - 1), min=1.0)
        scaled.append((q * factor[None, None, :, None], k, v))
    assert scaled[0][0].abs().sum() > raw[0][0].abs().sum()  # the decode rows are past the window: scaled up
    expected = _expected(scaled, seq_lens, lambda n: cfg, inv, d**-0.5)
    atol = 2e-4 if query.is_cuda else 1e-5
    torch.testing.assert_close(out.cpu().double(), expected, atol=atol, rtol=0)


def test_cudnn_plan_lengths_are_few_and_close():
    """Every prefill length maps to a bucket at most 1/32 (or 63 tokens) longer, monotone, 32 buckets an octave:
    a server's varied prompt lengths build a handful of cuDNN plans, not one per prompt."""
    from selfextend_llm.kernels.lse import plan_length

    lengths = range(1, 70000)
    buckets = [plan_length(n) for n in lengths]
    assert all(b >= n and b - n <= max(63, n // 32) for n, b in zip(lengths, buckets, strict=True))
    assert all(a <= b for a, b in zip(buckets, buckets[1:], strict=False))
    assert len({b for b in buckets if 16384 < b <= 32768}) == 32
    assert plan_length(16384) == 16384  # a bucket is its own length: no padding


def test_warm_up_runs_every_kind_of_step_a_server_meets(monkeypatch):
    """The backend's start-up compile: a whole prompt past the window, a chunk, decode rows together and alone,
    each through the real paged attention (finite outputs), with the engine's block size and table width."""
    from selfextend_llm.config import SelfExtendConfig
    from selfextend_llm.kernels import paged

    ran = []
    real = paged.paged_selfextend_attention

    def spy(query, kv_cache, **kw):
        out = real(query, kv_cache, **kw)
        assert torch.isfinite(out).all()
        ran.append((kw["seq_lens"], kw["query_start_loc"], kw["block_table"].shape, kv_cache.shape[2]))
        return out

    monkeypatch.setattr(paged, "paged_selfextend_attention", spy)
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).double() / 16))
    steps = paged.warm_up(
        heads=4, kv_heads=2, head_size=16, dtype=torch.float32, device=torch.device("cpu"), block_size=16,
        table_width=40, config=SelfExtendConfig(4, 32), inv_freq=inv, scale=0.25, pretrained_context=64,
    )  # fmt: skip
    assert [(s, q) for s, q, _, _ in ran] == steps and all(width == 40 for _, _, (_, width), _ in ran)
    q_lens = [[b - a for a, b in zip(q, q[1:], strict=False)] for _, q in steps]
    n = steps[0][0][0]
    assert n > 32  # past the window
    assert q_lens[0] == [n, 7, 1, 1] and q_lens[1] == [1]  # whole, chunk, two decodes; one decode alone
    with pytest.raises(ValueError, match="too narrow"):
        paged.warm_up(
            heads=4, kv_heads=2, head_size=16, dtype=torch.float32, device=torch.device("cpu"), block_size=16,
            table_width=2, config=SelfExtendConfig(4, 32), inv_freq=inv, scale=0.25, pretrained_context=64,
        )  # fmt: skip


def test_a_borrowed_causal_kernel_is_checked_against_the_formula_before_it_is_trusted():
    """vLLM's FA3 is taken for the grouped part only after it matches the explicit formula on the call's own first
    rows; a kernel with the wrong mask or a wrong LSE is refused."""
    from selfextend_llm.kernels.lse import agrees_with_math, causal_mask, math_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 300, 16, generator=g)[:, :, 40:]  # a strided view, as the grouped queries are
    k, v = torch.randn(1, 2, 260, 16, generator=g), torch.randn(1, 2, 260, 16, generator=g)

    def exact(q, k, v, scale):
        return math_attention(q, k, v, causal_mask(q.shape[2], k.shape[2], q.device), scale)

    def no_mask(q, k, v, scale):
        return math_attention(q, k, v, None, scale)

    def base2_lse(q, k, v, scale):
        out, lse = exact(q, k, v, scale)
        return out, lse * 1.4426950408889634

    assert agrees_with_math(exact, q, k, v, 0.25)
    assert not agrees_with_math(no_mask, q, k, v, 0.25)
    assert not agrees_with_math(base2_lse, q, k, v, 0.25)


def _varlen_or_skip(query: torch.Tensor):
    """The varlen function a test runs: vLLM's FlashAttention 3 on a GPU where it is installed, else the float64
    stand-in with its documented semantics (``reference_varlen_attention``) around the real Triton pack/merge."""
    from selfextend_llm.reference import reference_varlen_attention

    if not triton_kernels.available(query.device):
        pytest.skip("the varlen pack/merge kernels run in Triton's interpreter or on CUDA")
    if query.is_cuda and query.dtype != torch.float32:
        fa = pytest.importorskip("vllm.vllm_flash_attn").flash_attn_varlen_func
        return fa
    return reference_varlen_attention


@pytest.mark.parametrize(
    ("seq_lens", "q_lens"),
    [
        ([300, 97, 1, 180, 20], [1, 97, 1, 64, 20]),  # decode, whole prompt, 1-token prompt, chunk, inside window
        ([520, 40, 333], [128, 1, 333]),  # a late chunk (prefix-cache hit) beside a decode row and a prompt
        ([33, 34], [33, 2]),  # one key past the window, two new rows of which only the last has grouped keys
    ],
)
@pytest.mark.parametrize("log_scale", [0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.filterwarnings("error::UserWarning")  # a fallback to the per-sequence loop would hide a wrong kernel
def test_every_prefill_of_a_step_in_two_varlen_calls_matches_the_float64_formula(seq_lens, q_lens, log_scale, dtype):
    """The step's prefill chunks of each grouping packed for two varlen calls (band on the paged cache, grouped part
    on packed grouped keys) and merged by LSE: per-length groupings, plain short rows, chunks, log scaling."""
    if dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("Triton's interpreter computes bfloat16 through NumPy, which has none; covered on the GPU")
    heads, kv_heads, d = 4, 2, 32
    cache, table, query, starts, raw, inv = _batch(11, seq_lens, q_lens, heads, kv_heads, d, 16, dtype)
    fa = _varlen_or_skip(query)
    scale = d**-0.5

    def config_for(n: int) -> SelfExtendConfig | None:
        return None if n < 30 else SelfExtendConfig(3 if n < 400 else 8, 32, log_scale=log_scale)

    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("block_table") is not None)
        return fa(*args, **kwargs)

    out = paged_selfextend_attention(
        query, cache, block_table=table, seq_lens=seq_lens, query_start_loc=starts, config_for=config_for,
        inv_freq=inv.float().to(query.device), scale=scale, pretrained_context=128, batch_decodes=False,
        varlen_attention=counted,
    )  # fmt: skip
    prefills = {config_for(n) for n, q in zip(seq_lens, q_lens, strict=True) if q > 1}
    grouped = {config_for(n) for n, q in zip(seq_lens, q_lens, strict=True) if q > 1 and n > 32 and config_for(n)}
    assert calls.count(True) == len(prefills) and calls.count(False) == len(grouped)  # two calls a grouping at most
    scaled = []
    for (q, k, v), n in zip(raw, seq_lens, strict=True):
        cfg = config_for(n)
        if cfg is not None and log_scale:
            pos = torch.arange(n - q.shape[2], n, dtype=torch.float64, device="cpu")
            q = q * torch.clamp(1 + log_scale * (torch.log(pos + 1) / math.log(128) - 1), min=1.0)[None, None, :, None]
        scaled.append((q, k, v))
    expected = _expected(scaled, seq_lens, config_for, inv, scale)
    atol = 3e-2 if dtype == torch.bfloat16 else 2e-4 if query.is_cuda else 1e-5
    torch.testing.assert_close(out.cpu().double(), expected, atol=atol, rtol=0)


def test_a_varlen_function_that_disagrees_is_dropped_and_the_step_is_still_right(monkeypatch):
    """Another package's kernel is trusted only after its first step matched the per-sequence path: a wrong one
    (here, the band's window one key short) is dropped with a warning, that step's answer is the loop's, and it is
    never called again in the process."""
    from selfextend_llm.kernels import paged
    from selfextend_llm.reference import reference_varlen_attention

    monkeypatch.setattr(paged, "_VARLEN_TRUSTED", set())
    monkeypatch.setattr(paged, "_VARLEN_FAILED", set())
    seq_lens, q_lens = [120, 70], [120, 30]
    cache, table, query, starts, raw, inv = _batch(12, seq_lens, q_lens, 4, 2, 32, 16, torch.float32)
    _varlen_or_skip(query)
    calls = []

    def off_by_one(*args, window_size=(-1, -1), **kwargs):
        calls.append(1)
        left = window_size[0] - 1 if window_size[0] > 0 else window_size[0]
        return reference_varlen_attention(*args, window_size=[left, window_size[1]], **kwargs)

    args = dict(
        block_table=table, seq_lens=seq_lens, query_start_loc=starts, config_for=lambda n: SelfExtendConfig(3, 32),
        inv_freq=inv.float().to(query.device), scale=32**-0.5, pretrained_context=64, varlen_attention=off_by_one,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="differs from the per-sequence path"):
        first = paged_selfextend_attention(query, cache, **args)
    expected = _expected(raw, seq_lens, args["config_for"], inv, 32**-0.5)
    atol = 2e-4 if query.is_cuda else 1e-5
    torch.testing.assert_close(first.cpu().double(), expected, atol=atol, rtol=0)
    made = len(calls)
    second = paged_selfextend_attention(query, cache, **args)
    assert len(calls) == made and torch.equal(first, second)
