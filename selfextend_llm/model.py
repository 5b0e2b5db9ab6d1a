"""``SelfExtendModel``: a loaded model with SelfExtend, a tokenizer and a thread-safe generate API.

The frameworks (LangChain, LlamaIndex, the CLI, the server) all stand on this class, so it owns
what they share: prompt preparation (raw text or chat messages through the model's template),
the context-window check, stop strings of any length, streaming, usage counts and the lock
that makes one instance safe to call from many threads.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import TextIteratorStreamer

from . import tokens as tokens_mod
from . import tools as tools_mod
from . import tuning, validation
from .attention import Backend, check_backend
from .config import SelfExtendConfig
from .engine import prefix_cache as prefix_mod
from .engine.sampling import Sampling, SamplingProcessor
from .engine.threads import in_passing_thread
from .generation import FastGeneration, compile_errors, recompile_limit_errors
from .hf import apply as hf_apply
from .hf import native_step
from .kernels import native
from .loading import DEFAULT_NAME, load_pretrained
from .stopping import StopScan, find_stop, normalize_stops, visible_pieces

if TYPE_CHECKING:
    from .engine.scheduler import ContinuousBatcher

Prompt = str | Sequence[Mapping[str, Any]]

#: Sampling arguments taken by every generate entry point (beyond max_new_tokens and stop).
SAMPLING_ARGUMENTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
#: The arguments the batcher takes (:meth:`SelfExtendModel.complete_shared`); others are ``generate``'s.
SHARED_ARGUMENTS = frozenset(
    {"max_new_tokens", "stop", *SAMPLING_ARGUMENTS, "tools", "tool_choice", "response_format", "timeout"}
)


@dataclass
class Completion:
    """One finished generation with its usage counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of text or a stop string) or "length"
    #: Prompt tokens whose keys and values came from the prefix cache (not computed again).
    cached_tokens: int = 0


@dataclass
class StreamChunk:
    """A piece of streamed text; the last chunk has ``finish_reason`` and the usage counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class _Call:
    """One call, prepared: prompts encoded and padded, generation arguments checked."""

    encoded: list[list[int]]
    ids: torch.Tensor
    mask: torch.Tensor
    max_new: int
    stops: list[str]
    kwargs: dict[str, Any]
    #: The prompts are chat messages (through the chat template): the table's chat entries apply.
    chat: bool = False
    sampling: Sampling = Sampling()
    #: Filled by the run: prompt tokens reused from the prefix cache.
    cached_tokens: int = 0
    #: Filled by the run: the grouping it ran (a cached prefix's own, or the one for its length).
    grouping: SelfExtendConfig | None = None


class ContextWindowExceededError(ValueError):
    """The prompt does not fit the (extended) context window."""


class _StopCriteria:
    """Stops a row once its new text contains a stop string, or when cancelled."""

    def __init__(self, tokenizer, stops: list[str], prompt_len: int, cancel: threading.Event):
        self.tokenizer, self.stops, self.prompt_len, self.cancel = tokenizer, stops, prompt_len, cancel
        self.tail = max((len(s) for s in stops), default=0) + 8

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.cancel.is_set():
            return ~done
        if not self.stops:
            return done
        for row in range(input_ids.shape[0]):
            new = input_ids[row, self.prompt_len :][-self.tail :]
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            done[row] = find_stop(text, self.stops) is not None
        return done


class SelfExtendModel:
    """A causal LM with SelfExtend applied, ready to answer prompts longer than its trained window.

    ``context_window`` is the advertised (extended) length; a prompt longer than it raises
    :class:`ContextWindowExceededError` before any work starts.  With ``adaptive=True`` (the
    default when no group size was fixed) each call picks the grouping for its own length:
    prompts that fit the trained window run exactly as the plain model.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        config: SelfExtendConfig | None,
        context_window: int,
        name: str = "model",
        adaptive: bool = False,
        fast_generation: bool | None = None,
        neighbor_window: int | None = None,
        plan: tuning.Plan | None = None,
        prefix_cache_bytes: int | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.pretrained_context = hf_apply.pretrained_context(model)
        self.context_window = context_window
        self.model_name = name
        self.adaptive = adaptive
        #: How each call's grouping is chosen (:mod:`selfextend_llm.tuning`); an explicit
        #: ``neighbor_window`` is kept by every call.
        self.plan = (
            None
            if config is None
            else plan
            or tuning.Plan(
                config, context_window, adaptive, name, self.pretrained_context, neighbor_window,
                tuning.find_table(name, self.pretrained_context) if adaptive else None,
            )
        )  # fmt: skip
        if fast_generation is None:
            # Measured faster on both (BENCHMARKS.md): on a GPU the static cache with compiled steps
            # (10-13x), on the CPU the static cache alone (1.3-1.6x: no per-step copy of the cache;
            # compiling there cost a minute per cache size and did not pay).
            fast_generation = True
        #: The static-cache, compiled-decode path (:mod:`selfextend_llm.generation`).
        self.fast = FastGeneration(model, enabled=bool(fast_generation))
        installed = (
            native_step.install(model)
            if self.fast.enabled and self.device.type == "cpu"
            else "off: " + ("fast_generation=False" if not self.fast.enabled else f"device {self.device.type}")
        )
        self._native_why = installed if isinstance(installed, str) else "removed by native_step.uninstall()"
        # A plain Lock, not an RLock: a stream may be advanced (and closed) from different worker threads.
        self._lock = threading.Lock()
        self._batcher: ContinuousBatcher | None = None
        self._batcher_lock = threading.Lock()
        self._grammars: Any = None  # compiled JSON grammars (structured.JSONGrammars), made on first use
        #: Keys and values of recent prompts, reused for calls that share their first tokens
        #: (:mod:`selfextend_llm.engine.prefix_cache`); ``prefix_cache_bytes=0`` turns it off.
        self.prefix_cache = prefix_mod.PrefixCache(
            prefix_mod.default_budget(self.device) if prefix_cache_bytes is None else prefix_cache_bytes
        )
        #: What the last generation ran (grouping, cached tokens, path): ``describe()["last_call"]``.
        self.last_call: dict[str, Any] | None = None

    # ----------------------------------------------------------------- properties
    @property
    def native_decoder(self) -> native_step.NativeDecoder | str:
        """On the CPU, decode steps of Llama-style models run as one C call (:mod:`.hf.native_step`);
        a string says why not.  Only static-cache steps (the fast path's) are taken."""
        runner = getattr(self.model, "_selfextend_native", None)
        return runner if runner is not None else self._native_why

    @property
    def self_extend(self) -> bool:
        return self.config is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def native_tools(self) -> bool:
        """Whether the chat template renders tool definitions itself (else the prompted format is used)."""
        template = getattr(self.tokenizer, "chat_template", None) or ""
        return "tools" in template

    @property
    def supports_tools(self) -> bool:
        """Whether tool calling works: every chat model, through its template's own tool rendering or, for
        templates without one, the prompted format of :func:`selfextend_llm.tools.tools_instruction`."""
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def tool_format(self) -> str | None:
        """``"template"`` (the chat template renders tools), ``"prompted"`` (our documented format) or None."""
        if not self.supports_tools:
            return None
        return "template" if self.native_tools else "prompted"

    def prepare_tools(
        self, prompt: Prompt, tools: Any, tool_choice: Any = None
    ) -> tuple[Prompt, list[dict[str, Any]] | None, str | None]:
        """``(prompt, tools, must_call)`` for a call with tools, checked before any work.

        ``tools`` in OpenAI's function format; ``tool_choice`` ``"auto"``/``None``, ``"none"`` (tools not
        offered), ``"required"``/``"any"`` or a tool's name (OpenAI's object shape too).  A forced choice
        adds the instruction to the prompt and returns ``must_call`` (``""``: any tool), which the decoder
        is then held to (:meth:`constraint`).
        """
        if tools is None and tool_choice in (None, "auto", "none"):
            return prompt, None, None
        validation.prompt(prompt)
        checked = tools_mod.check_tools(tools) if tools is not None else None
        offer, must_call = tools_mod.resolve_choice(checked, tool_choice)
        if not offer:
            return prompt, None, None
        if isinstance(prompt, str):
            raise ValueError("tools need a chat prompt (a list of messages), not a plain string")
        if not self.supports_tools:
            raise ValueError(f"{self.model_name} has no chat template, so it cannot call tools")
        if must_call is not None:
            prompt = self.with_instruction(prompt, tools_mod.must_call_instruction(must_call or None))
        return prompt, checked, must_call

    def parse_tool_calls(self, text: str) -> tuple[str, list[tools_mod.ToolCall]]:
        """Content and tool calls of an answer.

        A tokenizer that ships a response parser (transformers' ``parse_response`` with the model's
        ``response_template``/``response_schema``) is asked first, for templates whose calls are not in the
        ``<tool_call>`` format; otherwise, or when it finds nothing, ``<tool_call>`` blocks are parsed
        (unparseable ones come back with ``error``).
        """
        own = self._parse_with_tokenizer(text)
        return own if own is not None else tools_mod.parse_tool_calls(text)

    def _parse_with_tokenizer(self, text: str) -> tuple[str, list[tools_mod.ToolCall]] | None:
        tok = self.tokenizer
        if getattr(tok, "response_template", None) is None and getattr(tok, "response_schema", None) is None:
            return None
        try:
            try:
                parsed = tok.parse_response(text, prefix="")
            except TypeError:  # older transformers: no prefix argument
                parsed = tok.parse_response(text)
        except Exception:  # the model's parser could not read this answer: fall back to <tool_call> blocks
            return None
        raw_calls = (parsed or {}).get("tool_calls") or []
        if not raw_calls:
            return None
        calls = []
        for raw in raw_calls:
            fn = raw.get("function", raw) if isinstance(raw, dict) else {}
            args = fn.get("arguments", {})
            call = tools_mod.ToolCall(name=str(fn.get("name", "")), arguments={}, raw=str(raw))
            try:
                call.arguments = json.loads(args) if isinstance(args, str) else dict(args)
                if not call.name:
                    raise ValueError("the parsed call has no name")
            except (ValueError, TypeError) as err:
                call.error = str(err)
            calls.append(call)
        return str(parsed.get("content") or "").strip(), calls

    @functools.cached_property
    def supports_system_role(self) -> bool:
        """Whether the chat template accepts a system message (Gemma 2/3's refuse one)."""
        try:
            self.tokenizer.apply_chat_template(
                [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], tokenize=False
            )
        except Exception:  # jinja2's TemplateError ("System role not supported") and friends
            return False
        return True

    def with_instruction(self, messages: Sequence[Mapping[str, Any]], instruction: str) -> list[dict[str, Any]]:
        """``messages`` with ``instruction`` added where the template can take it.

        Merged into the caller's own system message when there is one (never a second system turn),
        else a new system message, else (templates without a system role) the start of the first
        user turn.
        """
        out = [dict(m) for m in messages]
        if out and out[0].get("role") in ("system", "developer"):
            own = validation.text_parts(out[0].get("content") or "")
            out[0] = {**out[0], "role": "system", "content": f"{instruction}\n\n{own}" if own else instruction}
            if not self.supports_system_role:
                first = out.pop(0)["content"]
                return self.with_instruction(out, first)
            return out
        if self.supports_system_role:
            return [{"role": "system", "content": instruction}, *out]
        for i, m in enumerate(out):
            if m.get("role") == "user":
                own = validation.text_parts(m.get("content") or "")
                out[i] = {**m, "content": f"{instruction}\n\n{own}"}
                return out
        return [{"role": "user", "content": instruction}, *out]

    @property
    def quality_context(self) -> int | None:
        """How far the model was measured to read *well*: the longest prompt length at which held-out
        retrieval (wordings, fillers and passages the tuner never ranked on) reached
        :data:`~selfextend_llm.tuning.QUALITY_BAR`, raw and through the chat template, at every tuned
        length up to it; at most :attr:`context_window`.  :attr:`context_window` is the hard limit (a
        longer prompt is refused); between the two, answers are not measured to hold.  None where it is
        not known: a grouping fixed by the caller, or a table never validated past the trained window.
        """
        if self.plan is None:
            return None  # SelfExtend off: the plain model reads its own window
        if not self.plan.adaptive or self.plan.table is None:
            return None
        reach = self.plan.table.quality_context()
        return None if reach is None else min(reach, self.context_window)

    def quality(self) -> dict[str, Any]:
        """What :attr:`quality_context` rests on: the bar, and the held-out retrieval measured per tuned length,
        ``{"bar": 0.9, "context": ..., "measured": {length: {"raw": worst raw family, "chat": worst chat one}}}``."""
        from .tuning import QUALITY_BAR

        table = self.plan.table if self.plan is not None and self.plan.adaptive else None
        measured = table.quality() if table is not None else {}
        return {"bar": QUALITY_BAR, "context": self.quality_context, "measured": measured}

    def describe(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "model": self.model_name,
            "pretrained_context": self.pretrained_context,
            "self_extend": self.self_extend,
            "group_size": cfg.group_size if cfg else None,
            "neighbor_window": cfg.neighbor_window if cfg else None,
            "log_scale": cfg.log_scale if cfg else None,  # strength of log-scaled queries (0: off)
            "formula_reach": cfg.max_context(self.pretrained_context) if cfg else self.pretrained_context,
            "context_window": self.context_window,
            # the hard window above; up to here held-out retrieval was measured at the bar (None: not measured)
            "quality_context": self.quality_context,
            "quality": self.quality(),
            "adaptive": self.adaptive,
            "settings_source": self.plan.source if self.plan is not None else "plain model (SelfExtend off)",
            "table": _table_lines(self.plan.table.entries if self.plan is not None and self.plan.table else []),
            "chat_table": _table_lines(
                self.plan.table.chat_entries if self.plan is not None and self.plan.table else []
            ),
            "device": str(self.device),
            "fast_generation": self.fast.describe(),
            "prefix_cache": self.prefix_cache.describe(),
            # group_size / neighbor_window above are the load-time setting; what the last call ran:
            "last_call": self.last_call,
            "quantized_weights": _weights(self.model),
            # the CPU decode step's C kernels: built, with which flags, or why not (PyTorch runs instead)
            "cpu_kernels": (
                {**native.describe(), "decode_step": _decode_step(self.native_decoder)}
                if self.device.type == "cpu"
                else None
            ),
        }

    def __repr__(self) -> str:
        d = self.describe()
        return (
            f"SelfExtendModel({d['model']!r}, trained={d['pretrained_context']}, context_window={d['context_window']}, "
            f"G={d['group_size']}, W={d['neighbor_window']})"
        )

    # ----------------------------------------------------------------- prompts
    def tokenize(self, text: str) -> list[int]:
        """Token ids of any text, the empty string included (for splitters and token counters)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._encode_text(text)

    def _encode_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``tokenizer(text)``'s ids; a long document is encoded in pieces on every core (exactly the same ids)."""
        ids = self._parallel_encoder.encode(text, add_special_tokens=add_special_tokens)
        if ids is None:
            ids = list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        return ids

    @functools.cached_property
    def _parallel_encoder(self) -> tokens_mod.ParallelEncoder:
        return tokens_mod.ParallelEncoder(self.tokenizer)

    def encode(self, prompt: Prompt, *, tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Token ids of a prompt: raw text as is, chat messages through the model's chat template."""
        validation.prompt(prompt)
        if isinstance(prompt, str):
            ids = self.tokenize(prompt)
            if not ids:
                raise ValueError(
                    f"prompt {prompt[:40]!r} encodes to no tokens with {self.model_name}'s tokenizer (it drops "
                    "these characters); give some text"
                )
            return ids
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.model_name} has no chat template; pass a plain string prompt instead")
        kwargs: dict[str, Any] = {"add_generation_prompt": True, "tokenize": False}
        messages = [{**m, "content": validation.text_parts(m["content"])} for m in prompt]
        if tools:
            tools = tools_mod.check_tools(tools)
        if self.native_tools:
            if tools:
                kwargs["tools"] = tools
        else:  # the prompted format: the contract in the system instruction, earlier calls as text
            if tools_mod.has_tool_turns(messages):
                messages = tools_mod.as_plain_chat(messages)
            if tools:
                messages = self.with_instruction(messages, tools_mod.tools_instruction(tools))
        try:
            text = self.tokenizer.apply_chat_template(messages, **kwargs)
        except Exception as err:  # jinja2's TemplateError and friends: the template refused these messages
            if type(err).__module__.split(".")[0] != "jinja2":
                raise
            raise ValueError(
                f"{self.model_name}'s chat template cannot render these messages ({err}); check the roles and "
                "their order"
            ) from err
        # encoded as tokenize=True would: the rendered text, no special tokens added (the template has them)
        return self._encode_text(text, add_special_tokens=False)

    def count_tokens(self, prompt: Prompt) -> int:
        """Tokens the prompt takes, counted with the model's own tokenizer and chat template."""
        return len(self.encode(prompt))

    def check_fits(self, n_tokens: int) -> None:
        if n_tokens > self.context_window:
            cfg = self.config
            how = (
                f"SelfExtend G={cfg.group_size}, W={cfg.neighbor_window} on a {self.pretrained_context}-token model"
                if cfg
                else "plain model, SelfExtend off"
            )
            raise ContextWindowExceededError(
                f"prompt is {n_tokens} tokens, longer than the context window of {self.context_window} tokens ({how}); "
                "shorten the prompt or load with a larger target_context"
            )

    # ----------------------------------------------------------------- generation
    def use_grouping(self, config: SelfExtendConfig | None) -> None:
        """Run the next forward passes with ``config`` (None: exactly the plain model).  The caller holds the lock."""
        if self.plan is None:
            return
        settings = hf_apply.settings_of(self.model)
        settings.bypass = config is None
        if config is not None:
            settings.config = config

    def grouping_for(self, total_tokens: int, chat: bool = False) -> SelfExtendConfig | None:
        """The grouping a call of ``total_tokens`` (prompt + new tokens) runs with a fresh prompt
        (None: the plain model); a call that continues a cached prefix may keep the prefix's own."""
        return None if self.plan is None else self.plan.config_for(total_tokens, chat)

    def _continues(
        self, wanted: SelfExtendConfig | None, prompt_tokens: int, total_tokens: int,
        cached: SelfExtendConfig | None, shared: int,
    ) -> bool:  # fmt: skip
        """Whether a call that would run ``wanted`` may continue ``shared`` tokens computed under ``cached``.

        The same grouping always.  Another one only when the prefix is most of the prompt (a document
        asked about again, a chat that goes on: computing it again would cost what reuse saves) and
        its reach covers the call; a short shared head (a chat template's system turn) never changes the
        grouping of a call.  A plain prefix reaches the trained window."""
        if cached == wanted:
            return True
        if self.plan is None or 2 * shared < prompt_tokens:
            return False
        reach = self.pretrained_context if cached is None else cached.max_context(self.pretrained_context)
        return total_tokens <= min(reach, self.context_window)

    @functools.cached_property
    def eos_ids(self) -> frozenset[int]:
        """The token ids that end a generation (the generation config may list several)."""
        return frozenset(_as_list(self.model.generation_config.eos_token_id))

    def _gen_kwargs(self, max_new_tokens: int, **extra: Any) -> dict[str, Any]:
        """``generate`` arguments: always greedy for transformers; sampling, when asked for, is our
        :class:`~.engine.sampling.SamplingProcessor` (the batcher's sampler), added by :meth:`_start`."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id,
            "do_sample": False, "temperature": None, "top_p": None, "top_k": None,
        }  # fmt: skip
        kwargs.update(extra)
        return kwargs

    def _prepare(
        self, prompts: Sequence[Prompt], max_new_tokens: int, tools, sampling: Sampling
    ) -> tuple[list[list[int]], int]:
        """Check every argument, encode the prompts, check they fit: all before any generation."""
        validation.integer("max_new_tokens", max_new_tokens, minimum=1)
        if not _is_prompt_list(prompts):
            raise TypeError("prompts must be a non-empty list of prompts (strings or message lists)")
        encoded = [self.encode(p, tools=tools) for p in prompts]
        longest = max(len(e) for e in encoded)
        for e in encoded:
            self.check_fits(len(e))
        room = self.context_window - longest
        return encoded, max(1, min(max_new_tokens, room))

    def _until_eos(self, new: list[int]) -> list[int]:
        """Generated ids up to (not including) the first end-of-sequence token (padding follows it)."""
        return next((new[:i] for i, t in enumerate(new) if t in self.eos_ids), new)

    def _batch_tensors(self, encoded: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(e) for e in encoded)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):  # left padding: every row ends at the same index
            ids[row, width - len(e) :] = torch.tensor(e, dtype=torch.long)
            mask[row, width - len(e) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _generate(
        self, call: _Call, criteria, streamer=None, prefix: prefix_mod.Hit | None = None
    ) -> tuple[torch.Tensor, Any, str]:
        """``model.generate`` on the fast path where it is on, else (or if it fails to compile) the dynamic one.

        Returns the sequences, the cache they leave (for the prefix cache) and which path ran.  With
        ``prefix``, the cache starts with the prefix's keys and values and only the rest of the prompt
        is computed.  A compile failure can come after some tokens were streamed; generation then
        resumes from them on the dynamic cache, so the stream neither repeats nor loses a token.
        """
        ids, mask, max_new, kwargs = call.ids, call.mask, call.max_new, call.kwargs
        extra = {} if streamer is None else {"streamer": streamer}
        fast = self.fast.generate_kwargs(ids.shape[0], ids.shape[1] + max_new)
        if fast:
            cache = fast[self.fast.cache_arg]
            if prefix is not None:
                prefix.load_into(cache)
                if self.self_extend:  # the grouped-key mirrors describe the previous call's keys
                    hf_apply.clear_cache(self.model)
            started = time.perf_counter()
            scope = self.fast.compile_scope() if "compile_config" in fast else contextlib.nullcontext()
            try:
                with scope:
                    out = self.model.generate(
                        input_ids=ids, attention_mask=mask, stopping_criteria=[criteria], **fast, **kwargs, **extra
                    )
                self.fast.timed(ids.shape[0], ids.shape[1] + max_new, started)
                return out, cache, "static cache" + (", compiled" if "compile_config" in fast else "")
            except recompile_limit_errors() as err:  # too many shapes: forget the compiled ones, keep the path
                self.fast.forget_compiled(err)
            except compile_errors() as err:
                self.fast.disable(err)
            if self.self_extend:
                hf_apply.clear_cache(self.model, keep_static=self.fast.active)
            prefix = None  # the failed call may have written past it: compute everything again
            if streamer is not None and streamer.generated:
                done = torch.tensor([streamer.generated], dtype=ids.dtype, device=ids.device)
                streamer.next_tokens_are_prompt = True  # the resumed call's input is not news
                ids, mask = torch.cat([ids, done], 1), torch.cat([mask, torch.ones_like(done)], 1)
                kwargs = {**kwargs, "max_new_tokens": max_new - done.shape[1]}
                if kwargs["max_new_tokens"] < 1:
                    streamer.end()
                    return ids, None, "dynamic cache"
        from transformers import DynamicCache

        # No config: every layer keeps all its keys (sliding layers too; their mask still slides), so
        # what the call leaves can be reused whole.
        cache = DynamicCache()
        if prefix is not None:
            prefix.load_into(cache)
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, stopping_criteria=[criteria], **{self.fast.cache_arg: cache},
            **kwargs, **extra,
        )  # fmt: skip
        return out, cache, "dynamic cache"

    def _start(
        self,
        prompts: Sequence[Prompt],
        max_new_tokens: int,
        stop: str | Sequence[str] | None,
        temperature: float,
        top_p: float | None,
        seed: int | None,
        tools: Sequence[Mapping[str, Any]] | None,
        generate_kwargs: dict[str, Any],
    ) -> _Call:
        """Everything a call needs, checked and encoded before any work (and before taking the lock)."""
        stops = normalize_stops(stop)
        extras = {k: generate_kwargs.pop(k, None) for k in ("top_k", "min_p", "repetition_penalty")}
        sampling = Sampling.checked(temperature, top_p, seed=seed, **extras)
        response_format = generate_kwargs.pop("response_format", None)
        tool_choice = generate_kwargs.pop("tool_choice", None)
        checked, must_call = None, None
        if (tools is not None or tool_choice is not None) and _is_prompt_list(prompts):
            prepared = [self.prepare_tools(p, tools, tool_choice) for p in prompts]
            prompts = [p for p, _, _ in prepared]
            checked, must_call = prepared[0][1], prepared[0][2]
        # a bad schema or tool fails here, before any work
        constraint = self.constraint(response_format, tools=checked, must_call=must_call)
        encoded, max_new = self._prepare(prompts, max_new_tokens, checked, sampling)
        ids, mask = self._batch_tensors(encoded)
        kwargs = self._gen_kwargs(max_new, **generate_kwargs)
        rows = []
        if constraint is not None:
            rows = [constraint] + [
                self.constraint(response_format, tools=checked, must_call=must_call) for _ in encoded[1:]
            ]
            for row in rows:  # the answer closes validly before max_new_tokens (structured.Closers)
                row.budget = max_new
        generators = [sampling.generator(self.device) for _ in encoded]
        kwargs.update(self._processors(rows, ids.shape[1], sampling, generators))
        chat = all(not isinstance(p, str) for p in prompts)
        return _Call(encoded, ids, mask, max_new, stops, kwargs, chat, sampling)

    def _processors(
        self, constraints: Sequence[Any], prompt_len: int, sampling: Sampling, generators: Sequence[Any]
    ) -> dict[str, Any]:
        """``generate``'s ``logits_processor`` for rows' constraints (one per row, or none) and sampling:
        the constraint first, so the sampler picks among allowed tokens (the batcher's order)."""
        processors: list[Any] = []
        if constraints:
            from .structured import ConstrainedLogits

            processors.append(ConstrainedLogits(list(constraints), prompt_len, self.tokenizer.decode))
        if not sampling.greedy or sampling.penalised:
            processors.append(SamplingProcessor(sampling, generators))
        return {"logits_processor": processors} if processors else {}

    def constraint(
        self,
        response_format: Mapping[str, Any] | None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        must_call: str | None = None,
    ) -> Any:
        """A fresh :class:`~selfextend_llm.structured.Constraint` (None: free text).

        ``response_format``: ``{"type": "json_object"}``, ``{"type": "json_schema", "json_schema": {"schema":
        ...}}`` or a bare JSON schema; the output is then valid JSON (for the schema) by construction.
        ``must_call`` (from :meth:`prepare_tools`): the answer is one call of that tool (``""``: any of
        ``tools``) with schema-valid arguments.
        """
        if must_call is not None and response_format is not None:
            raise ValueError("a forced tool_choice and response_format cannot both shape one answer; send one of them")
        if response_format is None and must_call is None:
            return None
        from .structured import JSONGrammars

        with self._batcher_lock:
            if self._grammars is None:
                vocab = self.model.get_output_embeddings().out_features  # nn.Linear or QuantizedLinear
                self._grammars = JSONGrammars(self.tokenizer, vocab)
        if must_call is not None:
            return self._grammars.tool_call(tools or [], must_call or None)
        return self._grammars.constraint(response_format)

    def _run(
        self, call: _Call, criteria: Any, streamer: Any = None, handover: dict[str, Any] | None = None
    ) -> torch.Tensor:
        """Generate for a prepared call (the caller holds the lock): grouping for its length (or the
        cached prefix's), the generation, then the sequence's keys and values into the prefix cache and
        the per-call grouped-key caches dropped whatever happened.

        With ``handover`` (a dict), ``handover["kv"]`` gets what the call computed (``(n, keys, values)``
        or None), whatever the prefix cache's budget: the batcher continues a lone request from it."""
        total = call.ids.shape[1] + call.max_new
        config = self.grouping_for(total, call.chat)
        hit = None
        if call.ids.shape[0] == 1:
            accepts = functools.partial(self._continues, config, len(call.encoded[0]), total)
            hit = self.prefix_cache.lookup(call.encoded[0], accepts)
            if hit is not None:
                config = hit.entry.config
        call.cached_tokens, call.grouping = 0 if hit is None else hit.length, config
        self.use_grouping(config)
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                out, cache, path = self._generate(call, criteria, streamer, hit)
                if cache is not None and out.shape[0] == 1:
                    self._keep_prefix(out[0], cache, config, handover)
        finally:
            if self.self_extend:
                hf_apply.clear_cache(self.model, keep_static=self.fast.active)
        self.last_call = _call_record(config, self.plan is not None, call, path, time.perf_counter() - started)
        return out

    def _keep_prefix(
        self, sequence: torch.Tensor, cache: Any, config: SelfExtendConfig | None, handover: dict | None = None
    ) -> None:
        """Store the keys and values a call computed (prompt and answer but its last token, which was never
        fed back) in the prefix cache, and in ``handover`` when given (see :meth:`_run`); copies, since a
        static cache is reset and reused."""
        store = self.prefix_cache.enabled
        if not store and handover is None:
            return
        n = min(int(sequence.shape[0]) - 1, int(cache.get_seq_length()))
        layers = getattr(cache, "layers", None)
        if n < 1 or not layers or any(getattr(x, "keys", None) is None for x in layers):
            return
        per_token = sum(
            (layer.keys[:, :, :1].numel() + layer.values[:, :, :1].numel()) * layer.keys.element_size()
            for layer in layers
        )
        store = store and n >= self.prefix_cache.min_tokens and per_token * n <= self.prefix_cache.max_bytes
        if not (store or handover is not None) or any(layer.keys.shape[2] < n for layer in layers):
            return
        keys = [layer.keys[:, :, :n].clone() for layer in layers]
        values = [layer.values[:, :, :n].clone() for layer in layers]
        if handover is not None:
            handover["kv"] = (n, keys, values)
        if store:
            self.prefix_cache.store(sequence[:n], config, keys, values)

    # ----------------------------------------------------------------- prompt caches on disk
    def _fingerprint(self) -> dict[str, Any]:
        cfg = hf_apply.text_config(self.model)
        return {
            "model": self.model_name, "layers": int(cfg.num_hidden_layers),
            "kv_heads": hf_apply.kv_heads(cfg),
            "vocab": int(cfg.vocab_size), "trained": self.pretrained_context, "dtype": str(self.model.dtype),
        }  # fmt: skip

    def cache_prompt(self, prompt: Prompt, *, tools: Sequence[Mapping[str, Any]] | None = None) -> int:
        """Compute and keep the keys and values of ``prompt`` now (a document before its questions);
        returns how many of its tokens are cached.  Later calls that start with it skip them."""
        if not self.prefix_cache.enabled:
            raise ValueError("the prefix cache is off (prefix_cache_bytes=0); load with a budget to cache prompts")
        self.complete(prompt, max_new_tokens=1, tools=tools)
        hit = self.prefix_cache.peek(self.encode(prompt, tools=tools))
        return 0 if hit is None else hit.length

    def save_prompt_cache(self, prompt: Prompt, path: str | os.PathLike) -> int:
        """Write the keys and values of ``prompt`` to ``path`` (computing them first if not cached), for
        :meth:`load_prompt_cache` in a later process; returns the tokens saved."""
        ids = self.encode(prompt)
        hit = self.prefix_cache.peek(ids)
        if hit is None or hit.length < len(ids):
            self.cache_prompt(prompt)
            hit = self.prefix_cache.peek(ids)
        if hit is None or hit.length < len(ids):
            raise ValueError(
                f"prompt of {len(ids)} tokens could not be kept: its keys and values are larger than the prefix "
                f"cache budget ({self.prefix_cache.max_bytes} bytes); load with a larger prefix_cache_bytes"
            )
        keys, values = hit.kv()
        entry = prefix_mod.PrefixEntry(hit.entry.tokens[: hit.length], hit.entry.config, keys, values)
        prefix_mod.save(entry, path, model_name=self.model_name, fingerprint=self._fingerprint())
        return hit.length

    def load_prompt_cache(self, path: str | os.PathLike) -> int:
        """Read a file of :meth:`save_prompt_cache` into the prefix cache; returns its length in tokens."""
        entry = prefix_mod.load(
            path, model_name=self.model_name, fingerprint=self._fingerprint(), device=self.device,
            dtype=self.model.dtype,
        )  # fmt: skip
        self.prefix_cache.store(entry.tokens, entry.config, entry.keys, entry.values)
        hit = self.prefix_cache.peek(entry.tokens.tolist())
        if hit is None or hit.length < entry.length:
            raise ValueError(
                f"{os.fspath(path)!r} holds {entry.nbytes} bytes of keys and values, more than the prefix cache "
                f"budget ({self.prefix_cache.max_bytes}); load the model with a larger prefix_cache_bytes"
            )
        return entry.length

    def complete_batch(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int = 256,
        stop: str | Sequence[str] | None = None,
        temperature: float = 0.0,
        top_p: float | None = None,
        seed: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **generate_kwargs: Any,
    ) -> list[Completion]:
        """Generate for several prompts in one left-padded batch."""
        call = self._start(prompts, max_new_tokens, stop, temperature, top_p, seed, tools, generate_kwargs)
        with self._lock:
            out = self._run(call, _StopCriteria(self.tokenizer, call.stops, call.ids.shape[1], threading.Event()))
        results = []
        for row, e in enumerate(call.encoded):
            new = self._until_eos(out[row, call.ids.shape[1] :].tolist())
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            cut = find_stop(text, call.stops)
            if cut is not None:
                text = text[:cut]
            reason = "stop" if cut is not None or len(new) < call.max_new else "length"
            results.append(Completion(text, len(e), len(new), reason, call.cached_tokens))
        return results

    def complete(self, prompt: Prompt, **kwargs: Any) -> Completion:
        """Generate for one prompt; returns the text with usage counts and finish reason."""
        return self.complete_batch([prompt], **kwargs)[0]

    def batcher(self) -> ContinuousBatcher:
        """The model's shared continuous batcher (started on first use), for calls from many threads."""
        with self._batcher_lock:
            if self._batcher is None:
                from .engine.scheduler import ContinuousBatcher

                self._batcher = ContinuousBatcher(self)
            return self._batcher

    def complete_shared(self, prompt: Prompt, **kwargs: Any) -> Completion:
        """:meth:`complete`, sharing decode steps with concurrent calls (framework ``batch()``, thread pools).

        The call goes through the model's :meth:`batcher`: alone it runs the fast single-sequence path
        there, and when others arrive they share its decode steps, so N concurrent calls cost about one
        batched generation rather than N in a row.  Extra ``generate`` keyword arguments (which only
        ``model.generate`` understands) take :meth:`complete` instead.
        """
        if set(kwargs) - SHARED_ARGUMENTS:
            return self.complete(prompt, **kwargs)
        return self.batcher().submit(prompt, **kwargs).result()

    def stream_shared(self, prompt: Prompt, **kwargs: Any) -> Iterator[StreamChunk]:
        """:meth:`stream_chunks` through the :meth:`batcher` (see :meth:`complete_shared`): a stream holds
        no lock, so it never stalls concurrent calls; closing the iterator early cancels the request."""
        if set(kwargs) - SHARED_ARGUMENTS:
            yield from self.stream_chunks(prompt, **kwargs)
            return
        yield from self.batcher().submit(prompt, **kwargs)

    def generate(
        self,
        prompt: Prompt,
        max_new_tokens: int = 256,
        stop: str | Sequence[str] | None = None,
        temperature: float = 0.0,
        **kwargs: Any,
    ) -> str:
        """Generate text for a raw prompt (str) or chat messages (list of dicts); stop strings are cut off."""
        return self.complete(prompt, max_new_tokens=max_new_tokens, stop=stop, temperature=temperature, **kwargs).text

    def stream_chunks(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int = 256,
        stop: str | Sequence[str] | None = None,
        temperature: float = 0.0,
        top_p: float | None = None,
        seed: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **generate_kwargs: Any,
    ) -> Iterator[StreamChunk]:
        """Stream :class:`StreamChunk` pieces; the last carries the finish reason and usage.

        Generation runs in a worker thread; closing the iterator early cancels it.
        """
        call = self._start([prompt], max_new_tokens, stop, temperature, top_p, seed, tools, generate_kwargs)
        cancel = threading.Event()
        streamer = _RecordingStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=None)
        criteria = _StopCriteria(self.tokenizer, call.stops, call.ids.shape[1], cancel)
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["new"] = self._run(call, criteria, streamer)[0, call.ids.shape[1] :].tolist()
            except BaseException as err:  # surface errors in the consumer
                result["error"] = err
                streamer.end()

        self._lock.acquire()
        worker = None
        exhausted = False  # the streamer's end signal was consumed
        try:
            worker = threading.Thread(target=work, daemon=True)
            worker.start()
            scan = StopScan()
            for piece in visible_pieces(streamer, call.stops, scan):
                yield StreamChunk(piece)
            if scan.stopped:  # stopped on a stop string: cancel and let the worker finish
                cancel.set()
                for _ in streamer:
                    pass
            exhausted = True
            worker.join()
            if "error" in result:
                raise result["error"]
            n_new = len(self._until_eos(result.get("new", [])))
            reason = "stop" if scan.stopped or n_new < call.max_new else "length"
            yield StreamChunk(
                "", finish_reason=reason, prompt_tokens=len(call.encoded[0]), completion_tokens=n_new,
                cached_tokens=call.cached_tokens,
            )  # fmt: skip
        finally:
            cancel.set()
            if worker is not None:
                if not exhausted:  # the consumer left early
                    for _ in streamer:
                        pass
                worker.join()
            self._lock.release()

    def stream(self, prompt: Prompt, **kwargs: Any) -> Iterator[str]:
        """Stream the answer as text pieces (stop strings never appear, even split across pieces)."""
        for chunk in self.stream_chunks(prompt, **kwargs):
            if chunk.text:
                yield chunk.text


class TokenRecorder:
    """A ``generate`` streamer that only keeps the generated ids: :meth:`SelfExtendModel._generate` resumes
    from them after a compile fallback instead of generating (and reporting) the tokens again."""

    def __init__(self) -> None:
        self.generated: list[int] = []
        self.next_tokens_are_prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self.next_tokens_are_prompt:  # the first call carries the prompt
            self.next_tokens_are_prompt = False
            return
        self.generated.extend(value.reshape(-1).tolist())

    def end(self) -> None:
        """Nothing to flush."""


class _RecordingStreamer(TextIteratorStreamer):
    """A text streamer that also keeps the generated token ids (to resume after a fallback)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.generated: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        if not (self.skip_prompt and self.next_tokens_are_prompt):
            self.generated.extend(value.reshape(-1).tolist())
        super().put(value)


def _call_record(
    config: SelfExtendConfig | None, extended: bool, call: _Call, path: str, seconds: float
) -> dict[str, Any]:
    """``describe()["last_call"]``: what one generation actually ran."""
    return {
        "prompt_tokens": max(len(e) for e in call.encoded),
        "rows": len(call.encoded),
        "chat": call.chat,
        "grouping": "plain" if config is None else config.label,
        "group_size": None if config is None else config.group_size,
        "neighbor_window": None if config is None else config.neighbor_window,
        "log_scale": None if config is None else config.log_scale,
        "self_extend": extended and config is not None,
        "cached_tokens": call.cached_tokens,
        "path": path,
        "seconds": round(seconds, 3),
    }


def _table_lines(entries: Sequence[Any]) -> list[str]:
    return [f"<= {e.upto:,}: " + ("plain" if e.config is None else e.config.label) for e in entries]


def _is_prompt_list(prompts: Any) -> bool:
    return isinstance(prompts, Sequence) and not isinstance(prompts, (str, Mapping)) and bool(prompts)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


_SHARED: dict[tuple, SelfExtendModel] = {}
_SHARED_LOCK = threading.Lock()


def load_shared(**kwargs: Any) -> SelfExtendModel:
    """:func:`load` once per distinct set of arguments; later calls reuse the same weights.

    The framework wrappers use it so that two chat models built with the same arguments share one model.
    """
    key = tuple(sorted((k, str(v)) for k, v in kwargs.items() if v is not None))  # None is load's default
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = load(**kwargs)
        return _SHARED[key]


def _weights(model: torch.nn.Module) -> dict[str, Any] | None:
    """What :mod:`.hf.quantized` kept of the GGUF blocks (None: fp32 or not a GGUF load)."""
    attached = getattr(model, "selfextend_weights", None)
    return attached.describe() if attached is not None and attached.swapped else None


def _decode_step(decoder: native_step.NativeDecoder | str) -> dict[str, Any]:
    """How CPU decode steps run: in one C call (with counts), or the model's forward and why."""
    if isinstance(decoder, str):
        return {"native": False, "why_not": decoder}
    return {"native": True, **decoder.describe()}


def load(
    model: str | None = None,
    *,
    target_context: int | None = None,
    group_size: int | None = None,
    neighbor_window: int | None = None,
    gguf_file: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    self_extend: bool = True,
    device_map: str | dict | None = None,
    tp_plan: str | None = None,
    backend: Backend = "auto",
    fast_generation: bool | None = None,
    tuned_table: str | os.PathLike | bool | None = None,
    quantized_weights: bool | None = None,
    log_scale: float | bool | None = None,
    prefix_cache_bytes: int | None = None,
) -> SelfExtendModel:
    """Load a model (the embedded SmolLM2 default when ``model`` is None) with SelfExtend applied.

    The work runs in a thread that ends with it (:mod:`selfextend_llm.engine.threads`: the thread that
    computes next, a server's batcher, gets the CPUs' OpenMP pools to itself, twice as fast on 2 cores).

    * ``target_context``: the context to plan for; G and W are chosen for it (tuned values for
      the embedded default) and it becomes ``context_window``.  Default: 4x the trained window.
    * ``group_size`` / ``neighbor_window``: fix G and W yourself (then every call uses them);
      ``log_scale`` with them: the strength of log-scaled queries (0 or False: off, the default; 1 or True:
      LongLM's ``log(pos)/log(L)``; 0.5: half of its rise, what the embedded default's table runs at 28k-128k).
    * ``self_extend=False``: the same model, plain, for side-by-side comparison.
    * ``device_map="auto"`` spreads the layers over several GPUs (accelerate); ``tp_plan="auto"``
      splits the heads over the ranks of a ``torchrun`` job (transformers tensor parallelism).
    * ``backend``: which attention kernels (see :func:`selfextend_llm.apply`); ``"auto"`` by default.
    * ``fast_generation``: decode over a static cache sized in buckets (on a GPU with compiled
      steps and CUDA graphs); on by default.  ``False`` keeps the dynamic-cache path.
    * ``tuned_table``: the table of measured settings per length, from ``selfextend-llm tune``.
      Default: the model's own file in ``<cache>/tuned/`` if one was saved, else the table shipped
      for it (the embedded default has one), else the rule of thumb.  ``False``: rule of thumb only.
      ``describe()["settings_source"]`` says which one is in use.
    * ``quantized_weights``: keep a GGUF file's 4-/8-bit blocks for the linear layers (CPU decode
      reads ~4x fewer bytes; prefill computes the same numbers as fp32).  Default: on for a GGUF
      file on the CPU in float32.  ``False``: fp32 copies.  ``describe()["quantized_weights"]``.
    * ``prefix_cache_bytes``: memory for the keys and values of recent prompts, reused by calls that start
      with the same tokens (a second question about one document computes only the question).  Default:
      an eighth of the free memory, at most 8 GiB (``SELFEXTEND_PREFIX_CACHE_BYTES`` overrides); 0: off.
    """
    options = {k: v for k, v in locals().items() if k != "model"}
    return in_passing_thread(_load, model, **options)


def _load(
    model: str | None,
    *,
    target_context: int | None,
    group_size: int | None,
    neighbor_window: int | None,
    gguf_file: str | None,
    device: str | torch.device | None,
    dtype: torch.dtype | str | None,
    self_extend: bool,
    device_map: str | dict | None,
    tp_plan: str | None,
    backend: Backend,
    fast_generation: bool | None,
    tuned_table: str | os.PathLike | bool | None,
    quantized_weights: bool | None,
    log_scale: float | bool | None,
    prefix_cache_bytes: int | None,
) -> SelfExtendModel:
    check_backend(backend)  # before the (slow) load
    validation.optional_integer("target_context", target_context, minimum=1)
    validation.optional_integer("group_size", group_size, minimum=1)
    validation.optional_integer("neighbor_window", neighbor_window, minimum=1)
    validation.optional_integer("prefix_cache_bytes", prefix_cache_bytes, minimum=0)
    log_scale = validation.log_strength(log_scale, group_size)
    if not isinstance(self_extend, bool):
        raise TypeError(f"self_extend must be True or False, got {self_extend!r}")
    if fast_generation is not None and not isinstance(fast_generation, bool):
        raise TypeError(f"fast_generation must be True, False or None (automatic), got {fast_generation!r}")
    lm, tok, name = load_pretrained(
        model, gguf_file=gguf_file, device=device, dtype=dtype, device_map=device_map, tp_plan=tp_plan,
        quantized_weights=quantized_weights,
    )  # fmt: skip
    trained = hf_apply.pretrained_context(lm)
    if not self_extend:
        if target_context is not None and target_context > trained:
            raise ValueError(
                f"target_context={target_context} needs SelfExtend: the plain model is trained on {trained} tokens"
            )
        return SelfExtendModel(
            lm, tok, config=None, context_window=trained, name=name, fast_generation=fast_generation,
            prefix_cache_bytes=prefix_cache_bytes,
        )  # fmt: skip
    plan = tuning.plan(
        name, trained, target_context=target_context, group_size=group_size, neighbor_window=neighbor_window,
        tuned_table=tuned_table, log_scale=log_scale,
    )  # fmt: skip
    hf_apply.apply(lm, plan.config, backend=backend)
    return SelfExtendModel(
        lm, tok, config=plan.config, context_window=plan.context_window, name=name, adaptive=plan.adaptive,
        fast_generation=fast_generation, neighbor_window=plan.neighbor_window, plan=plan,
        prefix_cache_bytes=prefix_cache_bytes,
    )  # fmt: skip


__all__ = [
    "Completion",
    "ContextWindowExceededError",
    "SelfExtendModel",
    "StreamChunk",
    "load",
    "load_shared",
    "DEFAULT_NAME",
]
