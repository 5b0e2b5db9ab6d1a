"""Continuous batching over one :class:`SelfExtendModel`: many requests share every decode step.

A scheduler thread runs the model.  A request that finds nothing else running takes the single-sequence
fast path (the static cache: compiled steps on a GPU, the C step on the CPU) inside that thread, so one
client gets what :meth:`SelfExtendModel.complete` gets; as soon as another request waits, the lone one
stops after its current token and hands over: the keys and values it computed become its row's cache,
only its last token is computed again, and it goes on in the batch (same tokens, same sampler state,
same constraint).  Otherwise requests wait in a bounded queue; at each step boundary
waiting requests are admitted and prefilled, a chunk of at most ``prefill_chunk`` tokens per step
(so a 16k-token prompt never stalls the running batch for its whole prefill), and finished ones
leave.  Each running request is one row of a left-padded batch: its own positions (SelfExtend
reads them per row), its own ``max_new_tokens``, stop strings, temperature, ``top_p`` and seed.

SelfExtend may choose a different grouping for different lengths (:meth:`tuning.Plan.config_for`),
and one forward runs one grouping, so running requests form one batch per grouping and the
batches take turns; a request's answer is then exactly what it would get alone (greedy decoding
is token for token the same; the tests check it).

transformers' own continuous batching (``generate_batch``) was not used: it pages the KV cache
through ``"paged|<name>"`` attention functions and silently swaps unknown implementations for
flash attention, and SelfExtend's grouped keys would need a paged variant of every kernel.  Here
the batch is a plain dynamic cache, so every SelfExtend path (CPU, Triton, block) serves it as is.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from .. import validation
from ..config import SelfExtendConfig
from ..hf import apply as hf_apply
from ..model import Completion, Prompt, SelfExtendModel, StreamChunk, TokenRecorder, _Call
from ..stopping import emittable, find_stop, normalize_stops
from .batch_cache import BatchCache
from .detokenize import IncrementalDetokenizer
from .prefix_cache import Hit, PrefixEntry, env_bytes, free_memory, shared_length
from .sampling import Sampling, pick

log = logging.getLogger("selfextend_llm.batching")


class QueueFullError(RuntimeError):
    """The wait queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, depth: int, retry_after: float):
        super().__init__(f"the server is busy: {depth} requests are waiting; retry in {retry_after:.0f} s")
        self.retry_after = retry_after


class ShuttingDownError(RuntimeError):
    """The batcher is draining (SIGTERM) and takes no new requests."""


class KVBudgetError(RuntimeError):
    """A request whose keys and values alone exceed the batcher's KV memory budget: it could never run."""


class RequestTimeoutError(TimeoutError):
    """A request ran past its deadline; what it had generated is dropped."""


@dataclass
class _Request:
    ids: list[int]
    max_new: int
    stops: list[str]
    sampling: Sampling
    generator: torch.Generator | None
    config: SelfExtendConfig | None
    deadline: float | None
    constraint: Any = None  # structured.Constraint: JSON valid by construction
    chat: bool = False
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    failed: BaseException | None = None  # this row's own error (its constraint): it leaves with it
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    shown: int = 0  # characters of the answer sent
    detok: IncrementalDetokenizer | None = None  # the answer's text, token by token (made at its first token)

    def gone(self, now: float) -> bool:
        """Cancelled (the client left) or past its deadline: it leaves at this step."""
        return self.cancelled.is_set() or (self.deadline is not None and now > self.deadline)


@dataclass
class _Batch:
    """Running requests that share one grouping: one left-padded dynamic cache."""

    config: SelfExtendConfig | None
    rows: list[_Request] = field(default_factory=list)
    cache: DynamicCache | None = None
    mask: torch.Tensor | None = None  # (rows, cache length), 1 for real tokens


@dataclass
class _Prefill:
    request: _Request
    cache: DynamicCache = field(default_factory=BatchCache)
    done_tokens: int = 0
    #: The tokens to prefill: the prompt, or for a request handed over from the single path its prompt
    #: and every token it generated (the last one's keys are computed here, then it samples the next).
    tokens: list[int] | None = None

    def __post_init__(self) -> None:
        if self.tokens is None:
            self.tokens = self.request.ids


class _SoloWatch:
    """Stopping criteria of a lone request on the single path: emits its text as the batcher does, and
    stops it when it finishes, leaves, or another request waits (then it hands over, see the module doc)."""

    def __init__(self, batcher: ContinuousBatcher, request: _Request, call: _Call):
        self.batcher, self.request, self.call = batcher, request, call
        self.seen, self.tokens, self.finished = len(request.ids), 0, False

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        request = self.request
        request.cached_tokens = self.call.cached_tokens  # the run's prefix lookup: the last chunk reports it
        if not self.finished:
            for token in input_ids[0, self.seen :].tolist():  # one token a step (more after a resume)
                self.seen, self.tokens = self.seen + 1, self.tokens + 1
                if self.batcher._emit(request, token):
                    self.finished = True
                    break
                request.generated.append(token)
        batcher = self.batcher
        batcher._expire_waiting()  # a client that gave up while this one runs leaves the queue now
        stop = self.finished or request.gone(time.monotonic()) or batcher._others_wait() or batcher._stopped
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class RequestHandle:
    """One submitted request: iterate it for :class:`StreamChunk` pieces, or wait for :meth:`result`."""

    def __init__(self, request: _Request, batcher: ContinuousBatcher):
        self._request, self._batcher = request, batcher

    def __iter__(self) -> Iterator[StreamChunk]:
        """Text pieces as they become safe to show; the last chunk has the finish reason and usage.
        Leaving early (closing the iterator) cancels the request."""
        try:
            while True:
                item = self._request.events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self.cancel()

    def result(self) -> Completion:
        """Block until the request finishes; the whole text with usage counts."""
        text, last = [], None
        for chunk in self:
            text.append(chunk.text)
            last = chunk
        return Completion(
            "".join(text), last.prompt_tokens, last.completion_tokens, last.finish_reason, last.cached_tokens
        )

    def cancel(self) -> None:
        """Stop generating for this request (a client hung up); its row leaves at the next step."""
        self._request.cancelled.set()
        self._batcher._wake.set()


class ContinuousBatcher:
    """Runs many requests on one model at once; see the module doc.

    * ``max_batch``: running requests at most (all groupings together);
    * ``max_queue``: waiting requests at most; past it :meth:`submit` raises :class:`QueueFullError`;
    * ``prefill_chunk``: prompt tokens prefilled per step, so long prompts do not starve the batch;
    * ``kv_budget_bytes``: memory the running requests' keys and values may take (None: half the memory
      free when the batcher starts, or ``$SELFEXTEND_KV_BUDGET_BYTES``).  A request is admitted only while
      what runs, with it, stays inside (its prompt and ``max_new_tokens``, left padding included); past it
      it waits its turn, and one that alone exceeds the budget is refused at :meth:`submit`
      (:class:`KVBudgetError`), never run out of memory;
    * ``on_step``: called after every step with ``(queue depth, running, new tokens)`` (metrics).
    """

    def __init__(
        self,
        model: SelfExtendModel,
        *,
        max_batch: int = 32,
        max_queue: int = 256,
        prefill_chunk: int = 512,
        kv_budget_bytes: int | None = None,
        on_step: Any = None,
    ):
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("prefill_chunk", prefill_chunk)):
            validation.optional_integer(name, value, minimum=1)
        validation.optional_integer("kv_budget_bytes", kv_budget_bytes, minimum=1)
        self.model, self.max_batch, self.max_queue, self.prefill_chunk = model, max_batch, max_queue, prefill_chunk
        #: The KV memory budget in bytes, and what one token of one row takes (keys, values, grouped keys).
        self.kv_budget_bytes = default_kv_budget(model.device) if kv_budget_bytes is None else kv_budget_bytes
        self.kv_bytes_per_token = kv_bytes_per_token(model)
        self.on_step = on_step
        self._waiting: deque[_Request] = deque()
        self._prefills: list[_Prefill] = []
        self._batches: dict[SelfExtendConfig | None, _Batch] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._draining = False
        self._stopped = False
        self._step_seconds = 0.05
        #: Requests run alone on the single fast path, and how many of them handed over to the batch.
        self.solo_runs, self.handovers = 0, 0
        self._solo_request: _Request | None = None
        self._thread = threading.Thread(target=self._loop, daemon=True, name="selfextend-batcher")
        self._thread.start()

    # ------------------------------------------------------------------ public
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (no new requests are taken)."""
        return self._draining or self._stopped

    @property
    def running(self) -> int:
        """Requests being generated (the lone one on the single path included)."""
        solo = self._solo_request is not None
        return sum(len(b.rows) for b in self._batches.values()) + len(self._prefills) + solo

    def submit(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int = 256,
        stop: str | Sequence[str] | None = None,
        temperature: float = 0.0,
        top_p: float | None = None,
        seed: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        timeout: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        response_format: Mapping[str, Any] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
    ) -> RequestHandle:
        """Queue a request (checked now: a bad argument raises here, before it waits).

        ``response_format`` constrains the answer to JSON, a forced ``tool_choice`` to one valid tool call
        (see :meth:`SelfExtendModel.prepare_tools` and :meth:`SelfExtendModel.constraint`)."""
        if self._draining or self._stopped:
            raise ShuttingDownError("the server is shutting down and takes no new requests; retry elsewhere")
        validation.integer("max_new_tokens", max_new_tokens, minimum=1)
        sampling = Sampling.checked(temperature, top_p, top_k, min_p, repetition_penalty, seed)
        if timeout is not None:
            validation.number("timeout", timeout, minimum=0.0, exclusive_minimum=True)
        stops = normalize_stops(stop)
        prompt, tools, must_call = self.model.prepare_tools(prompt, tools, tool_choice)
        constraint = self.model.constraint(response_format, tools=tools, must_call=must_call)
        ids = self.model.encode(prompt, tools=tools)
        self.model.check_fits(len(ids))
        max_new = max(1, min(max_new_tokens, self.model.context_window - len(ids)))
        config = self.model.grouping_for(len(ids) + max_new, not isinstance(prompt, str))
        need = (len(ids) + max_new) * self.kv_bytes_per_token
        if need > self.kv_budget_bytes:
            raise KVBudgetError(
                f"{len(ids)} prompt tokens and {max_new} new ones need {need / 2**20:.0f} MiB of keys and values, "
                f"more than this server's KV budget of {self.kv_budget_bytes / 2**20:.0f} MiB; send a shorter "
                f"prompt or max_tokens, or raise the budget ({KV_BUDGET_ENV} or kv_budget_bytes)"
            )
        if constraint is not None:  # the answer closes validly before max_new (structured.Closers)
            constraint.budget = max_new
        request = _Request(
            ids, max_new, stops, sampling, sampling.generator(self.model.device), config,
            None if timeout is None else time.monotonic() + timeout, constraint, not isinstance(prompt, str),
        )  # fmt: skip
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(len(self._waiting), self._retry_after())
            self._waiting.append(request)
        self._wake.set()
        return RequestHandle(request, self)

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with ``drain`` finish the admitted ones first (graceful shutdown)."""
        self._draining = True
        if not drain:
            self._stopped = True
        self._wake.set()
        self._thread.join(timeout)
        self._stopped = True

    # ------------------------------------------------------------------ scheduler
    def _retry_after(self) -> float:
        """A rough wait: the queue ahead, drained a batch per ``~max_new`` steps."""
        return max(1.0, len(self._waiting) / self.max_batch * 32 * self._step_seconds)

    def _loop(self) -> None:
        while True:
            busy = bool(self._prefills) or any(b.rows for b in self._batches.values())
            if self._stopped or (self._draining and not busy and not self._waiting):
                break
            if not busy and not self._waiting:
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            started = time.perf_counter()
            new_tokens = 0
            with self.model._lock:  # direct calls on the model interleave with steps, never overlap
                try:
                    new_tokens = self._step()
                except Exception as err:  # a bug, not a request's fault: fail what runs, keep serving
                    log.exception("batcher step failed")
                    self._fail_running(err)
            self._step_seconds = 0.9 * self._step_seconds + 0.1 * (time.perf_counter() - started)
            if self.on_step is not None:
                self.on_step(self.queue_depth, self.running, new_tokens)
        self._fail_running(ShuttingDownError("the server shut down before this request finished"))
        for request in list(self._waiting):
            self._fail(request, ShuttingDownError("the server shut down before this request ran"))
        self._waiting.clear()

    def _step(self) -> int:
        """One scheduler step: expire, admit, one prefill chunk per prefilling request, one decode step per batch.

        Every prefilling request advances by at most ``prefill_chunk`` tokens a step, so short prompts
        admitted beside a long one finish their prefill at once and start decoding, and the running
        rows never wait for more than one chunk per prefill."""
        new_tokens = 0
        self._expire()
        if not self.running and (len(self._waiting) == 1 or (self._waiting and self.max_batch == 1)):
            with self._lock:
                request = self._waiting.popleft()
            return self._solo(request)
        self._admit()
        for job in list(self._prefills):
            new_tokens += self._prefill_step(job)
        for batch in list(self._batches.values()):
            if batch.rows:
                new_tokens += self._decode_step(batch)
        if not self._prefills and not any(b.rows for b in self._batches.values()):
            self._batches.clear()
            if self.model.self_extend:  # idle: free the grouped-key caches
                hf_apply.clear_cache(self.model.model, keep_static=self.model.fast.active)
        return new_tokens

    def _others_wait(self) -> bool:
        """Whether a lone request on the single path should hand over: another one waits and could join."""
        return bool(self._waiting) and self.max_batch > 1 and not self._stopped

    def _solo(self, request: _Request) -> int:
        """Run a lone request on the single-sequence fast path (:meth:`SelfExtendModel._run`: prefix
        reuse, the grouping for its length, the static cache) until it finishes or another request waits;
        then it joins the batch from the keys and values it computed.  Returns the tokens it generated."""
        model = self.model
        ids = torch.tensor([request.ids], device=model.device)
        kwargs = model._gen_kwargs(request.max_new)
        constraints = [] if request.constraint is None else [request.constraint]
        kwargs.update(model._processors(constraints, len(request.ids), request.sampling, [request.generator]))
        call = _Call(
            [request.ids], ids, torch.ones_like(ids), request.max_new, request.stops, kwargs, request.chat,
            request.sampling,
        )  # fmt: skip
        watch, handover = _SoloWatch(self, request, call), {}
        self.solo_runs += 1
        self._solo_request = request
        try:
            model._run(call, watch, TokenRecorder(), handover)
        except Exception as err:  # this request's fault (a constraint with no way on, out of memory)
            self._fail(request, err)
            return watch.tokens
        finally:
            self._solo_request = None
        if watch.finished:
            return watch.tokens
        if request.gone(time.monotonic()):
            self._finish_early(request)
            return watch.tokens
        self._hand_over(request, call.grouping, handover.get("kv"))
        return watch.tokens

    def _hand_over(self, request: _Request, config: SelfExtendConfig | None, kv: Any) -> None:
        """Continue a request stopped on the single path in the batch: its row's cache is what it computed
        (prompt and answer but the last token), so one token is computed again before the next is sampled.
        Without those keys (a call that failed over to another path) the prefix cache, or a full prefill,
        gives them."""
        self.handovers += 1
        request.config = config
        tokens = request.ids + request.generated
        if request.constraint is not None:  # the single path's constraint sees a token when the next is masked
            last = request.generated[-1]
            request.constraint.accept(last, self.model.tokenizer.decode([last]))
        job = _Prefill(request, tokens=tokens)
        if kv is not None and kv[0] == len(tokens) - 1:
            n, keys, values = kv
            Hit(PrefixEntry(torch.tensor(tokens[:n]), config, keys, values), n).load_into(job.cache)
            job.done_tokens = n
        elif self.model.prefix_cache.enabled:
            hit = self.model.prefix_cache.lookup(tokens[:-1], lambda cached, shared: cached == config)
            if hit is not None:
                hit.load_into(job.cache)
                job.done_tokens = hit.length
        self._prefills.insert(0, job)

    def _fail_running(self, error: BaseException) -> None:
        for job in self._prefills:
            self._fail(job.request, error)
        self._prefills = []
        for batch in self._batches.values():
            for request in batch.rows:
                self._fail(request, error)
        self._batches.clear()

    def _expire_waiting(self) -> None:
        """Cancelled and timed-out requests leave the queue."""
        now = time.monotonic()
        with self._lock:  # submit() appends from other threads
            gone = [r for r in self._waiting if r.gone(now)]
            for request in gone:
                self._waiting.remove(request)
        for request in gone:
            self._finish_early(request)

    def _expire(self) -> None:
        """Cancelled and timed-out requests leave, wherever they are."""
        now = time.monotonic()
        self._expire_waiting()
        for job in [j for j in self._prefills if j.request.gone(now)]:
            self._prefills.remove(job)
            self._finish_early(job.request)
        for batch in self._batches.values():
            gone = [r for r in batch.rows if r.gone(now)]
            for request in gone:
                self._finish_early(request)
            if gone:
                self._drop_rows(batch, [batch.rows.index(r) for r in gone])

    def _finish_early(self, request: _Request) -> None:
        if request.cancelled.is_set():
            request.events.put(RuntimeError("cancelled"))
        else:
            self._fail(request, RequestTimeoutError("the request ran past its timeout; retry with a longer timeout"))

    def _fail(self, request: _Request, error: BaseException) -> None:
        request.events.put(error)

    def _admit(self) -> None:
        """Start prefilling waiting requests while rows are free.

        A request that shares its first tokens with one being prefilled now waits for that prefill (which
        goes into the prefix cache) rather than computing the same keys beside it: sixteen questions about
        one document read it once."""
        cache = self.model.prefix_cache
        deferred: list[_Request] = []
        while self._waiting and self.running < self.max_batch:
            if not self._fits(self._waiting[0]):  # first come first served: the rest wait behind it
                break
            with self._lock:
                request = self._waiting.popleft()
            hit = cache.lookup(request.ids, self._accepts(request)) if cache.enabled else None
            if hit is None and cache.enabled and self._shares_prefill(request):
                deferred.append(request)
                continue
            job = _Prefill(request)
            if hit is not None:
                request.config, request.cached_tokens = hit.entry.config, hit.length
                hit.load_into(job.cache)
                job.done_tokens = hit.length
            self._prefills.append(job)
        if deferred:
            with self._lock:
                self._waiting.extendleft(reversed(deferred))

    def kv_in_use(self, extra: _Request | None = None) -> int:
        """Bytes of keys and values the running requests (and ``extra``) take at most: each grouping's batch
        is left-padded to its longest row's prompt and ``max_new_tokens``."""
        longest: dict[SelfExtendConfig | None, list[int]] = {}
        rows = [r for b in self._batches.values() for r in b.rows] + [j.request for j in self._prefills]
        for request in rows + ([] if extra is None else [extra]):
            longest.setdefault(request.config, []).append(len(request.ids) + request.max_new)
        return sum(len(v) * max(v) for v in longest.values()) * self.kv_bytes_per_token

    def _fits(self, request: _Request) -> bool:
        """Whether ``request`` may start now inside the KV budget (alone it always may: :meth:`submit`
        refused those that never fit)."""
        return not self.running or self.kv_in_use(request) <= self.kv_budget_bytes

    def _accepts(self, request: _Request):
        n, total = len(request.ids), len(request.ids) + request.max_new
        return lambda cached, shared: self.model._continues(request.config, n, total, cached, shared)

    def _shares_prefill(self, request: _Request) -> bool:
        """Whether a request being prefilled shares most of this one's prompt (at least half, and at least
        the prefix cache's shortest entry): then waiting for its keys beats computing them twice.

        Short prompts too: sixteen chat requests share the template's system prompt, and on a CPU the
        prefill is bound by arithmetic, so the second copy of those keys costs as much as the first."""
        need = max(self.model.prefix_cache.min_tokens, len(request.ids) // 2)
        for job in self._prefills:
            if min(len(request.ids) - 1, len(job.request.ids)) < need:
                continue
            shared = min(shared_length(request.ids, job.request.ids), len(request.ids) - 1)
            if shared >= need and self._accepts(request)(job.request.config, shared):
                return True
        return False

    def _forward(self, ids, mask, positions, cache) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                logits_to_keep=1,
            )  # fmt: skip
        return out.logits[:, -1].float().clone()  # a normal tensor: constraints mask it in place

    def _prefill_step(self, job: _Prefill) -> int:
        """One chunk of a prefilling request; on its last chunk, its first token, then it joins a batch."""
        request, device, tokens = job.request, self.model.device, job.tokens
        start = job.done_tokens
        end = min(len(tokens), start + self.prefill_chunk)
        ids = torch.tensor([tokens[start:end]], device=device)
        try:
            self.model.use_grouping(request.config)
            logits = self._forward(
                ids, torch.ones((1, end), dtype=torch.long, device=device),
                torch.arange(start, end, device=device)[None], job.cache,
            )  # fmt: skip
        except Exception as err:  # this request's fault (e.g. out of memory): the others go on
            self._prefills.remove(job)
            self._fail(request, err)
            return 0
        job.done_tokens = end
        if end < len(tokens):
            return 0
        self._prefills.remove(job)
        if self.model.prefix_cache.enabled and tokens is request.ids:  # for the next request that starts so
            layers = job.cache.layers
            self.model.prefix_cache.store(tokens, request.config, [x.keys for x in layers], [x.values for x in layers])
        token = self._sample(logits, [request])[0]
        if self._emit(request, token):
            return 1
        batch = self._batches.setdefault(request.config, _Batch(request.config))
        self._join(batch, request, job.cache, token)
        return 1

    def _join(self, batch: _Batch, request: _Request, cache: DynamicCache, token: int) -> None:
        """Left-pad the new row or the batch to one length and stack the new row under it."""
        n_new = cache.get_seq_length()
        if not batch.rows:
            batch.cache, batch.mask = cache, torch.ones((1, n_new), dtype=torch.long, device=self.model.device)
        else:
            n_old = batch.mask.shape[1]
            width = max(n_old, n_new)
            for old, new in zip(batch.cache.layers, cache.layers, strict=True):
                old.keys = torch.cat([_pad_left(old.keys, width), _pad_left(new.keys, width)])
                old.values = torch.cat([_pad_left(old.values, width), _pad_left(new.values, width)])
            new_mask = torch.ones((1, n_new), dtype=torch.long, device=self.model.device)
            batch.mask = torch.cat([_pad_left(batch.mask, width, dim=1), _pad_left(new_mask, width, dim=1)])
        batch.rows.append(request)
        request.generated.append(token)

    def _drop_rows(self, batch: _Batch, gone: list[int]) -> None:
        keep = [i for i in range(len(batch.rows)) if i not in set(gone)]
        batch.rows = [batch.rows[i] for i in keep]
        if not keep:
            batch.cache, batch.mask = None, None
            return
        index = torch.tensor(keep, device=self.model.device)
        mask = batch.mask.index_select(0, index)
        lead = int((mask.sum(0) == 0).long().cumprod(0).sum())  # columns that are padding in every row
        batch.mask = mask[:, lead:]
        for layer in batch.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, lead:]
            layer.values = layer.values.index_select(0, index)[:, :, lead:]

    def _decode_step(self, batch: _Batch) -> int:
        device = self.model.device
        last = torch.tensor([[r.generated[-1]] for r in batch.rows], device=device)
        mask = torch.cat([batch.mask, torch.ones((len(batch.rows), 1), dtype=torch.long, device=device)], 1)
        positions = (batch.mask.sum(1, keepdim=True)).to(device)
        try:
            self.model.use_grouping(batch.config)
            logits = self._forward(last, mask, positions, batch.cache)
        except Exception as err:  # a failed step fails its rows, not the other batches
            for request in batch.rows:
                self._fail(request, err)
            batch.rows, batch.cache, batch.mask = [], None, None
            return 0
        batch.mask = mask
        tokens = self._sample(logits, batch.rows)
        finished = []
        for i, (request, token) in enumerate(zip(batch.rows, tokens, strict=True)):
            if self._emit(request, token):
                finished.append(i)
            else:
                request.generated.append(token)
        if finished:
            self._drop_rows(batch, finished)
        return len(tokens)

    def _sample(self, logits: torch.Tensor, rows: list[_Request]) -> list[int]:
        """Each row's next token with its own sampling and seed (:func:`.engine.sampling.pick`, the
        single path's sampler too)."""
        for i, request in enumerate(rows):
            if request.constraint is not None:
                try:
                    request.constraint.mask_(logits[i])  # JSON valid by construction
                except ValueError as err:  # no valid continuation: this row fails, the others go on
                    request.failed, request.constraint = err, None
        tokens = logits.argmax(-1).tolist()
        for i, request in enumerate(rows):
            sampling = request.sampling
            if not sampling.greedy or sampling.penalised:
                history = torch.tensor(request.ids + request.generated) if sampling.penalised else None
                tokens[i] = pick(logits[i], sampling, request.generator, history)
            if request.constraint is not None:
                request.constraint.accept(tokens[i], self.model.tokenizer.decode([tokens[i]]))
        return tokens

    def _emit(self, request: _Request, token: int) -> bool:
        """Send what ``token`` makes safe to show; True when the request is finished."""
        if request.failed is not None:
            request.events.put(request.failed)
            return True
        eos = token in self.model.eos_ids
        detok = request.detok
        if detok is None:
            detok = request.detok = IncrementalDetokenizer(self.model.tokenizer)
        if not eos:
            detok.push(token)
        n_new = len(detok.ids)
        length = not eos and n_new >= request.max_new
        # a stop string can only start in text not shown yet (emittable held back any tail that could begin one)
        cut = find_stop(detok.text[request.shown :], request.stops)
        if cut is None and (eos or length):
            detok.finish()  # an incomplete character at the very end, as the whole answer decodes it
            cut = find_stop(detok.text[request.shown :], request.stops)
        text = detok.text
        if cut is not None or eos or length:
            end = len(text) if cut is None else request.shown + cut
            if end > request.shown:
                request.events.put(StreamChunk(text[request.shown : end]))
            reason = "length" if length and cut is None else "stop"
            request.events.put(StreamChunk("", reason, len(request.ids), n_new, request.cached_tokens))
            return True
        upto = emittable(text, request.stops)
        if upto > request.shown:
            request.events.put(StreamChunk(text[request.shown : upto]))
            request.shown = upto
        return False


#: Environment variable overriding the batcher's default KV memory budget (bytes).
KV_BUDGET_ENV = "SELFEXTEND_KV_BUDGET_BYTES"


def default_kv_budget(device: torch.device) -> int:
    """Half the memory free now on ``device`` (the rest: activations, the prefix cache, copies while rows
    join), or ``$SELFEXTEND_KV_BUDGET_BYTES``."""
    value = env_bytes(KV_BUDGET_ENV, minimum=1)
    return max(1, free_memory(device) // 2) if value is None else value


def kv_bytes_per_token(model: SelfExtendModel) -> int:
    """Bytes one token of one row keeps: keys and values of every layer, and with SelfExtend on the grouped
    copy of the keys its attention keeps between steps."""
    cfg = hf_apply.text_config(model.model)
    heads = int(cfg.num_attention_heads)
    kv_heads = hf_apply.kv_heads(cfg)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    tensors = 3 if model.self_extend else 2
    return int(cfg.num_hidden_layers) * kv_heads * head_dim * tensors * model.model.dtype.itemsize


def _pad_left(x: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    extra = width - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([torch.zeros(shape, dtype=x.dtype, device=x.device), x], dim)
