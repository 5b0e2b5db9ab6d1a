"""Which fused kernel should run SelfExtend's grouped part inside vLLM: cuDNN (what SDPA picks) or vLLM's FA3.

One whole prefill of ``--lengths`` tokens, SmolLM2's heads (9 query, 3 KV, dim 64), bf16, on one GPU: the
times (CUDA events, median of ``--repeats``: ``triton_blocks.bench``) of plain causal attention on FA3 (what plain
vLLM runs) and on cuDNN, of SelfExtend's whole split prefill (:func:`selfextend_llm.kernels.triton.prefill_split`),
of its grouped part alone on each kernel, and of the vLLM backend's paged prefill both ways (one prompt's step over
a paged cache: per sequence, and packed for two FA3 varlen calls merged by LSE, ``kernels/paged.py``).  Needs
vLLM's CUDA build (``vllm.vllm_flash_attn``) for the FA3 rows.

    PYTHONPATH=. python benchmarks/grouped_part_kernels.py --out results/grouped_part_kernels_h100.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from triton_blocks import bench  # this folder is on sys.path when a script in it runs


def measure(n: int, args: argparse.Namespace) -> dict:
    """One length's row: milliseconds per kernel, or why it failed."""
    from selfextend_llm.config import SelfExtendConfig
    from selfextend_llm.kernels import triton as tk
    from selfextend_llm.kernels.lse import _cudnn_causal
    from selfextend_llm.kernels.paged import paged_selfextend_attention

    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except ImportError:
        flash_attn_varlen_func = None
    heads, kv_heads, dim, dt = 9, 3, 64, torch.bfloat16
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, device="cuda").float() / dim))
    q = torch.randn(n, heads, dim, device="cuda", dtype=dt)  # token-major, as vLLM packs a step
    k = torch.randn(n, kv_heads, dim, device="cuda", dtype=dt)
    v = torch.randn_like(k)
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # (1, heads, n, d) views
    W, m = args.neighbor_window, n - args.neighbor_window
    off = torch.zeros(1, dtype=torch.long, device="cuda")
    cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    cu_m = torch.tensor([0, m], dtype=torch.int32, device="cuda")
    row = {"tokens": n}
    cases = {
        "cudnn causal (plain)": lambda: _cudnn_causal(qh, kh, vh, dim**-0.5),
        "cudnn causal (grouped part)": lambda: _cudnn_causal(qh[:, :, W:], kh[:, :, :m], vh[:, :, :m], dim**-0.5),
        "SelfExtend split prefill": lambda: tk.prefill_split(
            qh, kh, vh, offsets=off, group_size=args.group_size, neighbor_window=W, inv_freq=inv,
            scale=dim**-0.5,
        ),
    }  # fmt: skip
    page = 16
    blocks = -(-n // page)
    kv = torch.zeros(blocks * page, kv_heads, 2 * dim, device="cuda", dtype=dt)
    kv[:n] = torch.cat([k, v], dim=-1)
    cache = kv.view(blocks, page, kv_heads, 2 * dim).transpose(1, 2).contiguous()  # the backend's LBHNC layout
    table = torch.arange(blocks, dtype=torch.int32, device="cuda")[None]
    cfg = SelfExtendConfig(args.group_size, W)

    steps: dict[object, dict] = {}

    def paged(varlen):  # one step's dict for every call, as the layers of one engine step share it
        return paged_selfextend_attention(
            q, cache, block_table=table, seq_lens=[n], query_start_loc=[0, n], config_for=lambda _n: cfg,
            inv_freq=inv, scale=dim**-0.5, pretrained_context=8192, varlen_attention=varlen,
            step_cache=steps.setdefault(varlen, {}),
        )  # fmt: skip

    cases["paged prefill, per sequence"] = lambda: paged(False)
    if flash_attn_varlen_func is not None:
        cases["paged prefill, varlen FA3"] = lambda: paged(flash_attn_varlen_func)
        cases.update(varlen_stages(q, cache, table, n, cfg, inv, dim, flash_attn_varlen_func))
        cases["fa3 causal paged (plain vLLM)"] = lambda: flash_attn_varlen_func(
            q, cache[..., :dim].transpose(1, 2), cache[..., dim:].transpose(1, 2), max_seqlen_q=n, cu_seqlens_q=cu,
            max_seqlen_k=n, seqused_k=cu[1:], block_table=table, softmax_scale=dim**-0.5, causal=True,
            return_softmax_lse=True, fa_version=3,
        )  # fmt: skip

        def fa3(qq, kk, vv, cq, ck, mq, mk):
            return flash_attn_varlen_func(
                qq, kk, vv, max_seqlen_q=mq, cu_seqlens_q=cq, max_seqlen_k=mk, cu_seqlens_k=ck,
                softmax_scale=dim**-0.5, causal=True, return_softmax_lse=True, fa_version=3,
            )  # fmt: skip

        cases["fa3 causal (plain)"] = lambda: fa3(q, k, v, cu, cu, n, n)
        cases["fa3 causal (grouped part)"] = lambda: fa3(q[W:], k[:m], v[:m], cu_m, cu_m, m, m)
        cases["fa3 sliding window W"] = lambda: flash_attn_varlen_func(
            q, k, v, max_seqlen_q=n, cu_seqlens_q=cu, max_seqlen_k=n, cu_seqlens_k=cu, softmax_scale=dim**-0.5,
            causal=True, window_size=(W - 1, 0), return_softmax_lse=True, fa_version=3,
        )  # fmt: skip
    for name, fn in cases.items():
        try:
            row[name] = bench(fn, args.repeats)
        except Exception as err:  # noqa: BLE001 - a kernel missing on this GPU is a result, not a crash
            row[name] = f"failed: {type(err).__name__}: {str(err)[:200]}"
    return row


def varlen_stages(q, cache, table, n, cfg, inv, dim, fa) -> dict:
    """The varlen prefill's stages one by one (``kernels/paged.py: _prefill_rows_varlen``), to see where it goes."""
    from selfextend_llm.kernels.paged import _prefill_plans, split_kv, varlen_band, varlen_grouped
    from selfextend_llm.kernels.triton import varlen

    key_cache, value_cache = split_kv(cache, dim)
    G, W = cfg.group_size, cfg.neighbor_window

    def plan():
        return _prefill_plans([n], [0, n], lambda _n: cfg, table, 8192, set(), q.device)[0]

    p = plan()

    def pack_queries():
        return varlen.pack_queries(
            q, p.src, p.positions, p.grouped_row, p.n_grouped, group_size=G, neighbor_window=W, inv_freq=inv,
            factor=p.factor,
        )  # fmt: skip

    def pack_kv():
        return varlen.pack_grouped_kv(
            key_cache, value_cache, p.block_table, p.key_seq, p.key_positions, group_size=G, inv_freq=inv
        )

    (qn, qg), (kg, vg) = pack_queries(), pack_kv()

    def band():
        return varlen_band(fa, p, qn, key_cache, value_cache, dim**-0.5)

    def grouped():
        return varlen_grouped(fa, p, qg, kg, vg, dim**-0.5)

    b, g = band(), grouped()
    out = torch.empty_like(q)
    return {
        "varlen stage: plan (host, once a step)": plan,
        "varlen stage: pack queries": pack_queries,
        "varlen stage: pack grouped K/V": pack_kv,
        "varlen stage: band, FA3 window on the paged cache": band,
        "varlen stage: grouped part, FA3": grouped,
        "varlen stage: merge": lambda: varlen.merge_into(out, p.src, b, g, p.grouped_row),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16352, 65400])
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--neighbor-window", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="results/grouped_part_kernels.json")
    args = ap.parse_args()

    rows = []
    for n in args.lengths:
        rows.append(measure(n, args))
        print(json.dumps(rows[-1]), flush=True)
    names = [k for k in rows[0] if k != "tokens"]
    print(f"\n{torch.cuda.get_device_name(0)}, bf16, 9/3 heads, dim 64, ms (median of {args.repeats})\n")
    print("| kernel | " + " | ".join(f"{r['tokens']:,}" for r in rows) + " |\n|---|" + "---|" * len(rows))
    for name in names:
        cells = [f"{r[name]:.3f}" if isinstance(r[name], float) else "failed" for r in rows]
        print(f"| {name} | " + " | ".join(cells) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(0), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
