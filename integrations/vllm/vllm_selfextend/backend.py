"""The SelfExtend attention backend for vLLM V1, registered as ``CUSTOM``.

vLLM rotates queries and keys in the model (RoPE at true positions), writes the new keys and values
into its paged cache (:meth:`SelfExtendImpl.do_kv_cache_update`), then calls :meth:`SelfExtendImpl.forward`
with the step's packed queries: prefill chunks, whole prompts and decode tokens of many requests side by
side.  Each request is then the problem the rest of the project solves: its queries at positions
``n - q .. n - 1`` over its ``n`` cached keys, with the grouping chosen for its own length
(:class:`~vllm_selfextend.settings.Settings`).  The work is done by
:func:`selfextend_llm.kernels.paged.paged_selfextend_attention`, which is tested against the float64
formula on random block tables.

The cache is this backend's own plain layout (``LBHNC``: ``blocks, kv_heads, block_size, 2 * head``;
keys then values), written with ordinary indexing, so the same code serves the CPU and CUDA builds.
Tensor parallelism needs nothing more: vLLM gives each rank its own heads (``num_heads`` and
``num_kv_heads`` are per rank) and SelfExtend works head by head.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec

try:  # vLLM >= 0.3x names cache layouts; 0.26 (the CUDA build for torch 2.11) asks for a shape instead
    from vllm.v1.kv_cache_interface import KVCacheLayout
except ImportError:  # pragma: no cover - depends on the installed vLLM
    KVCacheLayout = None  # type: ignore[assignment,misc]

from selfextend_llm.hf.apply import UnsupportedModelError
from selfextend_llm.kernels.paged import paged_selfextend_attention, warm_up, write_kv

from .settings import Settings, inv_freq

#: under ``vllm.``: vLLM configures its own logger tree only, so a logger named ``vllm_selfextend...`` prints nothing
logger = init_logger("vllm.selfextend")

#: ``SELFEXTEND_VLLM_PROFILE=1``: time every attention call (synchronised, so slower) and log the totals by
#: kind of step every 300 calls: where a run's time goes, without a profiler.
PROFILE = os.environ.get("SELFEXTEND_VLLM_PROFILE") == "1"
_spent: dict[str, list[float]] = {}
_last_build = [0.0]
#: (heads, kv_heads, head, dtype, block size) whose kernels this process has compiled (:meth:`SelfExtendImpl._warm`)
_warmed: set[tuple] = set()


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def _account(kind: str, seconds: float, rows: int) -> None:
    entry = _spent.setdefault(kind, [0, 0.0, 0])
    entry[0] += 1
    entry[1] += seconds
    entry[2] += rows
    if sum(e[0] for e in _spent.values()) % 300 == 0:
        summary = ", ".join(f"{k}: {e[0]} calls {e[1]:.2f} s {e[2]} rows" for k, e in sorted(_spent.items()))
        logger.info(f"SelfExtend attention time: {summary}")


class SelfExtendBackend(AttentionBackend):
    """Decoder self-attention with SelfExtend over vLLM's paged KV cache."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[Any]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[SelfExtendImpl]:
        return SelfExtendImpl

    @staticmethod
    def get_builder_cls() -> type[SelfExtendMetadataBuilder]:
        return SelfExtendMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec: Any = None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [32, 64, 80, 96, 112, 128, 160, 192, 256]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[Any, ...]:
        return (KVCacheLayout.LBHNC,)

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, cache_dtype_str: str = "auto"
    ) -> tuple[int, ...]:
        """vLLM 0.26's way to ask for the layout: the same ``LBHNC`` (keys, then values, in the last dim)."""
        return (num_blocks, num_kv_heads, block_size, 2 * head_size)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


@dataclass
class SelfExtendMetadata:
    """One step's batch: where each request's queries start, how many keys it has, its blocks."""

    num_actual_tokens: int
    query_start_loc: list[int]
    seq_lens: list[int]
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    #: tensors derived from the step's batch, made by the first layer and reused by the others
    step_cache: dict[str, Any] = field(default_factory=dict)


class SelfExtendMetadataBuilder(AttentionMetadataBuilder[SelfExtendMetadata]):
    def __init__(
        self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> SelfExtendMetadata:
        m = common_attn_metadata
        reqs = m.num_reqs
        if PROFILE:  # one build per step: the wall time between builds is a whole step, attention and all
            now = time.perf_counter()
            if 0 < now - _last_build[0] < 5.0:  # not the idle gap between batches
                _account("step (wall)", now - _last_build[0], m.num_actual_tokens)
            _last_build[0] = now
        # one host copy per step, shared by every layer (on CUDA the lengths cost one sync per step)
        starts = m.query_start_loc_cpu[: reqs + 1].tolist()
        lens = m.seq_lens[:reqs].tolist()
        return SelfExtendMetadata(
            num_actual_tokens=m.num_actual_tokens,
            query_start_loc=starts,
            seq_lens=lens,
            block_table=m.block_table_tensor[:reqs],
            slot_mapping=m.slot_mapping,
        )


class SelfExtendImpl(AttentionImpl[SelfExtendMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        **extra: Any,
    ) -> None:
        model_config = get_current_vllm_config().model_config
        name = model_config.model
        refusals = {
            "it has sliding-window layers (keep them plain: serve such models in-process with selfextend_llm.load)": (
                sliding_window is not None
            ),
            "it uses ALiBi, not RoPE": alibi_slopes is not None,
            "it uses attention logit softcapping": bool(logits_soft_cap),
            "it uses attention sinks": sinks is not None,
            f"attention type {attn_type!r} is not decoder self-attention": attn_type != AttentionType.DECODER,
            f"kv_cache_dtype={kv_cache_dtype!r}: only 'auto' (the model dtype) is supported": kv_cache_dtype != "auto",
        }
        why = [reason for reason, refused in refusals.items() if refused]
        if why:
            raise UnsupportedModelError(f"the SelfExtend vLLM backend cannot serve {name}: {'; '.join(why)}")
        self.settings = Settings.from_config(model_config.hf_config)
        #: read here: vLLM's current config is set while layers are built, not during forward passes
        self._max_model_len = int(model_config.max_model_len)
        self.num_heads, self.head_size, self.num_kv_heads = num_heads, head_size, num_kv_heads
        self.scale = float(scale)
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        freqs, _ = inv_freq(model_config.hf_text_config, head_size)
        self._inv_freq = freqs.float()
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {}
        st = self.settings
        logger.info_once(
            f"SelfExtend attention: G={st.group_size}, W={st.neighbor_window}, log-scaled queries {st.log_scale} "
            f"({st.source}); trained {st.pretrained_context} -> max_model_len {st.context_window}"
        )

    def _freqs(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq_on:
            self._inv_freq_on[device] = self._inv_freq.to(device)
        return self._inv_freq_on[device]

    def _warm(self, query: torch.Tensor, kv_cache: torch.Tensor) -> None:
        """Compile every kernel variant a step can need while vLLM warms up (once a process and head layout).

        Called on vLLM's dummy runs once the KV cache exists; without it a fresh machine compiled mid-traffic (a
        chunked prefill's kernel took ~5 s of one step on an H100).  Skipped on the CPU (no Triton) and inside a
        CUDA graph capture; a failure only means compiling on first use, so it is logged, not raised.
        """
        if query.device.type != "cuda" or kv_cache.dim() != 4 or torch.cuda.is_current_stream_capturing():
            return
        block_size = kv_cache.shape[2]
        key = (self.num_heads, self.num_kv_heads, self.head_size, query.dtype, block_size)
        if key in _warmed:
            return
        _warmed.add(key)
        started = time.perf_counter()
        try:
            warm_up(
                heads=self.num_heads, kv_heads=self.num_kv_heads, head_size=self.head_size, dtype=query.dtype,
                device=query.device, block_size=block_size, table_width=-(-self._max_model_len // block_size),
                config=self.settings.config_for(self.settings.context_window), inv_freq=self._freqs(query.device),
                scale=self.scale, pretrained_context=self.settings.pretrained_context,
            )  # fmt: skip
        except Exception as err:  # noqa: BLE001 - compiling later is the fallback, and the engine must start
            why = f"{type(err).__name__}: {err}"
            logger.warning(f"SelfExtend kernel warm-up failed ({why}); kernels compile on first use")
            return
        logger.info(f"SelfExtend kernels compiled in {time.perf_counter() - started:.1f} s")

    def do_kv_cache_update(
        self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:  # fmt: skip
        write_kv(kv_cache, key, value, slot_mapping)

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: SelfExtendMetadata | None,
        output: torch.Tensor | None = None,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by the SelfExtend backend")
        if attn_metadata is None:  # profiling / warm-up run
            self._warm(query, kv_cache)
            return output
        n = attn_metadata.num_actual_tokens
        if PROFILE:
            _sync(query)
            started = time.perf_counter()
        paged_selfextend_attention(
            query[:n],
            kv_cache,
            block_table=attn_metadata.block_table,
            seq_lens=attn_metadata.seq_lens,
            query_start_loc=attn_metadata.query_start_loc,
            config_for=self.settings.config_for,
            inv_freq=self._freqs(query.device),
            scale=self.scale,
            pretrained_context=self.settings.pretrained_context,
            out=output[:n],
            step_cache=attn_metadata.step_cache,
        )
        if PROFILE:
            _sync(query)
            starts = attn_metadata.query_start_loc
            kind = "decode" if n == len(starts) - 1 else "prefill"
            _account(kind, time.perf_counter() - started, n)
        return output
