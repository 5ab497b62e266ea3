"""The continuous-batching engine: one thread owns the model and a KV cache of `max_batch` slots.

Continuous batching (Orca, Yu et al. 2022), split as vLLM's v1 engine splits it: each step is first planned as
data by `palmkit.infer.scheduler.plan_step` (retirement, admission, the prefill budget, which rows decode), then
executed here. Prompts are prefilled alone (B=1), at most `prefill_tokens` prompt tokens a step, shortest first,
so a long prompt is prefilled in chunks while the others keep decoding (SARATHI, Agrawal et al. 2023); every
decode step then feeds the last token of all running sequences at their own positions (B=running, T=1). Running
sequences stay packed in slots 0..B-1: when one finishes, the last one's cache rows move into its slot, so a step
works on a view of the first rows and copies nothing. Because a GEMM's speed
depends on its row count, the engine times each row count once at startup and pads the packed view with free
slots up to a faster count (`Engine.tune_step_rows`; measurements in benchmarks/README.md, "Decode step rows").
A client that disconnects is cancelled at the next step boundary, which frees its slot.

Greedy requests give exactly the tokens of `palmkit.infer.generate.generate`; each sampled request draws from its
own seeded generator, so a seeded request gives the same text whatever else runs.

Log-probabilities are per request (`SamplingParams.logprobs`, `.prompt_logprobs`): each event carries those of the
tokens accepted since the previous event (a final stop token, which the text never shows, left out), and the
sequence's first event those of its prompt, from the prefill's own logits. `max_new_tokens=0` only prefills
(scoring a prompt).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from palmkit.errors import PalmkitError
from palmkit.infer.grammar import Matcher, matchers
from palmkit.infer.interface import LanguageModel
from palmkit.infer.sampling import (
    SamplingBatch,
    SamplingParams,
    TokenLogprob,
    make_generator,
    sample_batch,
    token_logprobs,
)
from palmkit.infer.scheduler import SlotState, StepPlan, plan_step
from palmkit.infer.stop import StopRule
from palmkit.model.checkpoint import load_checkpoint
from palmkit.model.fused import FUSED_PARTS, fuse_projections
from palmkit.model.palm import Block, KVCache
from palmkit.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


PROMPT_LOGPROB_ROWS = 256  # prompt positions whose logits are scored together
# Prompt tokens prefilled per engine step, over all sequences being prefilled: a long prompt is prefilled in
# chunks between decode steps, so the running rows keep decoding and a short prompt is not kept waiting
# (chunked prefill, Agrawal et al. 2023, "SARATHI").
PREFILL_TOKENS = 128

# A request whose reader leaves this many events unread stops decoding until it has read them (the engine looks
# again every UNREAD_POLL seconds when nothing else runs): a client that does not read costs no decode steps and
# holds no more than its events so far.
UNREAD_EVENTS, UNREAD_POLL = 256, 0.01

# The default batch: past 64 rows a CPU decode step's time grows in proportion to its rows (no throughput left to
# gain, only latency to lose; benchmarks/README.md, "Serving against transformers serve"), and the KV cache may
# take at most this share of the free memory.
AUTO_MAX_BATCH, AUTO_CACHE_SHARE = 64, 0.25


@dataclass(frozen=True)
class EngineOptions:
    """How the serving engine runs a model: where, in which dtype, and how many sequences at once.

    Args:
        device: cpu, cuda, cuda:1, ... (a tensor-parallel server puts each rank on its own device instead)
        dtype: dtype of the weights, activations and KV cache
        max_batch: sequences decoded together (default: 64, fewer if their KV cache would take over a quarter
            of the free memory)
        max_queue: requests waiting beyond those; more are refused (a server answers 429)
        prefill_tokens: prompt tokens prefilled per engine step between decode steps: fewer answer a short
            request sooner beside a long prompt, more prefill long prompts faster
        autotune: time a decode step at each row count at start and pad steps to faster counts
        fuse: multiply q, k, v, gate and up as one matrix (palmkit.model.fused; exact): three matrix products a
            layer instead of seven; off by default, as it gained a few percent in bfloat16 and nothing in float32
            (benchmarks/README.md, "Decode step kernels")
        weight_layout: how each weight matrix is stored in memory (same values and shapes): rows (PyTorch's
            own), columns (its transpose contiguous), or auto: columns for float32 on a CPU, where a decode step's
            products with column-major weights are faster (benchmarks/README.md, "Weight layout")
    """

    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_batch: int | None = None
    max_queue: int = 64
    prefill_tokens: int = PREFILL_TOKENS
    autotune: bool = True
    fuse: bool = False
    weight_layout: Literal["auto", "rows", "columns"] = "auto"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise PalmkitError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.weight_layout not in ("auto", "rows", "columns"):
            raise PalmkitError(f"weight_layout must be auto, rows or columns, got {self.weight_layout!r}")
        if (self.max_batch is not None and self.max_batch < 1) or self.max_queue < 0 or self.prefill_tokens < 1:
            raise PalmkitError(f"need max_batch >= 1, max_queue >= 0 and prefill_tokens >= 1, got {self.max_batch}, "
                               f"{self.max_queue} and {self.prefill_tokens}")


@dataclass
class Event:
    """New output of one choice; `finish_reason` ("stop" or "length") or `error` is set on its last event."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # of the tokens new since the last event, when requested
    prompt_logprobs: list[TokenLogprob] | None = None  # of prompt[1:], on a sequence's first event, when requested


class Sink:
    """Where a request's events go: an asyncio queue, filled from the engine thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self.loop = loop or asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()


@dataclass(eq=False)
class Sequence_:
    index: int
    prompt: list[int]
    params: SamplingParams
    sink: Sink
    rule: StopRule
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    written: int = 0  # cache positions filled; the next token is fed at this position
    finish: str | None = None
    cancelled: bool = False
    logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet delivered
    prompt_logprobs: list[TokenLogprob] | None = None  # not yet delivered
    at: float = field(default_factory=time.monotonic)  # when submitted, then when its last token came
    matcher: Matcher | None = None  # its grammar's state, when its params carry a constraint (infer/grammar.py)


class EngineBusy(Exception):
    """The queue is full: the caller should retry shortly (a server answers 429)."""


class EngineStopped(Exception):
    """The engine thread is not running (a server answers 503)."""


class Engine:
    """Runs every request's generation on one thread, stepping all running sequences together."""

    def __init__(self, model: LanguageModel, tokenizer: Tokenizer, options: EngineOptions | None = None,
                 **changes: Any):
        """`changes`: EngineOptions fields that replace those of `options` (`Engine(m, t, max_batch=4)`)."""
        options = replace(options or EngineOptions(), **changes)
        max_batch = auto_max_batch(model) if options.max_batch is None else options.max_batch
        self.options = options = replace(options, max_batch=max_batch)
        self.prefill_tokens = options.prefill_tokens  # prompt tokens prefilled per step
        self.model, self.tokenizer = model, tokenizer
        self.config = model.config
        weight = model.embed_tokens.weight
        self.device = weight.device
        self.cache = KVCache(model.config, max_batch, dtype=weight.dtype, device=weight.device)
        self.max_batch, self.max_queue = max_batch, options.max_queue
        # A model vocabulary padded past the tokenizer's must never produce an id the tokenizer cannot decode.
        self.vocab = min(tokenizer.vocab_size, model.config.vocab_size)
        self._pending: deque[Sequence_] = deque()
        self._active: list[Sequence_] = []  # _active[i] owns cache row i
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.progress_at = time.monotonic()  # the engine thread's last sign of life; see `wedged`
        self.prompt_tokens = self.completion_tokens = self.decode_steps = 0
        self.autotune = options.autotune
        self.step_rows = list(range(max_batch + 1))  # decode rows for b running sequences; see tune_step_rows
        # called on the engine thread with (first token?, seconds since submission or since the previous token)
        self.token_observers: list[Callable[[bool, float], None]] = []

    # -- called from other threads ---------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """The engine thread runs and takes work (False from the moment it starts to stop or dies)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._active)

    def wedged(self, seconds: float) -> bool:
        """Work is waiting and the engine thread has not finished a step for `seconds` (stuck or far too slow)."""
        busy = self._pending or self._active or self._calls
        return bool(busy) and time.monotonic() - self.progress_at > seconds

    def start(self) -> Engine:
        """Start the engine thread (once)."""
        with self._cond:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name="palmkit-engine", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; unfinished requests get an error event."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, requests: Sequence[tuple[list[int], SamplingParams]], sink: Sink,
               stop_ids: Iterable[int] = ()) -> list[Sequence_]:
        """Queue one sequence per (prompt ids, params); all or none: a full queue raises EngineBusy."""
        stop_ids = frozenset(stop_ids)
        seqs = [Sequence_(i, list(prompt), p, sink,
                          StopRule(p, self.config.eos_id, len(prompt), self.config.max_seq_len, self.tokenizer,
                                   stop_ids),
                          make_generator(p.seed, self.device))
                for i, (prompt, p) in enumerate(requests)]
        # a grammar's matcher (milliseconds to build for a large schema: a server submits those off its event loop)
        for seq, m in zip(seqs, matchers([p.constraint for _, p in requests], self.tokenizer,
                                         [self.config.eos_id, *stop_ids]), strict=True):
            seq.matcher = m
        with self._cond:
            if not self.alive:
                raise EngineStopped("The engine is not running.")
            free = self.max_batch - len(self._active)
            if len(self._pending) + len(seqs) > self.max_queue + free:
                raise EngineBusy(f"The server is busy ({len(self._pending)} requests waiting); retry shortly.")
            self._pending.extend(seqs)
            self._cond.notify()
        return seqs

    def cancel(self, seqs: Iterable[Sequence_]) -> None:
        """Stop sequences early (client gone); their slots free up before the next decode step."""
        with self._cond:
            for seq in seqs:
                seq.cancelled = True
                if seq.finish is None and seq in self._pending:
                    self._pending.remove(seq)
            self._cond.notify()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn()` on the engine thread between steps (exclusive use of the model); a future of its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if not self.alive:  # nobody would ever run it
                raise EngineStopped("The engine is not running.")
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    async def run(self, fn: Callable[[], Any]) -> Any:
        """Await `fn()` run on the engine thread (for endpoints that need the model outside generation)."""
        return await asyncio.wrap_future(self.call(fn))

    # -- the engine thread -------------------------------------------------------------------------------

    def _loop(self) -> None:
        self.progress_at = time.monotonic()
        try:
            with torch.inference_mode():
                if self.autotune:
                    try:
                        self.step_rows = self.tune_step_rows()
                        log.info("decode rows per running count: %s", self.step_rows[1:])
                    except Exception:  # e.g. out of memory at the largest batch: serve untuned
                        log.exception("could not time the decode step; stepping exactly the running rows")
                self.progress_at = time.monotonic()
                while self._step():
                    self.progress_at = time.monotonic()
        except BaseException:
            log.critical("the engine thread died", exc_info=True)
            raise
        finally:
            with self._cond:
                self._stopping = True
                orphans = [*self._pending, *(s for s in self._active if s.finish is None)]
                self._pending.clear()
                calls = list(self._calls)
                self._calls.clear()
            self._fail(orphans, "the engine stopped")
            for _, future in calls:
                if future.set_running_or_notify_cancel():
                    future.set_exception(EngineStopped("The engine stopped."))
            self._active.clear()

    def _step(self) -> bool:
        with self._cond:
            while not (self._stopping or self._pending or self._active or self._calls):
                self._cond.wait()
            if self._stopping:
                return False
            calls = list(self._calls)
            self._calls.clear()
            plan = self._plan()
            idle = not (calls or plan.moves or plan.prefill or plan.decode or plan.admit
                        or len(plan.keep) < len(self._active))
            self._admit(plan)
            if idle:  # every running sequence waits for its reader: look again shortly rather than spin
                self._cond.wait(UNREAD_POLL)
                return True
        self._run_calls(calls)
        events: list[tuple[Sequence_, Event]] = []
        try:
            for src, dst in plan.moves:  # the sequence now in slot dst was in slot src
                self._move_row(src, dst, self._active[dst].written)
        except Exception as exc:
            return self._fail_all(events, exc)
        # A failure fails the sequences it touched, never the server: one prompt's prefill, or one whole step.
        for slot, n in plan.prefill:
            seq = self._active[slot]
            try:
                self._prefill(seq, slot, n, events)
            except Exception as exc:
                log.exception("prefill failed")
                seq.finish = "error"  # its slot is freed at the next step's retirement
                self._fail([seq], f"generation failed: {exc}")
        try:
            self._decode(plan, events)
        except Exception as exc:
            return self._fail_all(events, exc)
        self._deliver(events)
        return True

    def _plan(self) -> StepPlan:
        """This step's plan, from the running sequences and the first waiting ones (under the lock)."""
        running = [SlotState(max(0, len(s.prompt) - s.written), s.finish is not None or s.cancelled,
                             s.params.max_new_tokens > 0, id(s.sink), s.sink.queue.qsize() >= UNREAD_EVENTS)
                   for s in self._active]
        # the whole queue (at most max_queue + max_batch): a request past its share lets those behind it in
        waiting = [SlotState(len(s.prompt), s.cancelled, s.params.max_new_tokens > 0, id(s.sink),
                             s.sink.queue.qsize() >= UNREAD_EVENTS) for s in self._pending]
        return plan_step(running, waiting, self.max_batch, self.prefill_tokens, self.step_rows)

    @staticmethod
    def _run_calls(calls: list[tuple[Callable[[], Any], concurrent.futures.Future]]) -> None:
        for fn, future in calls:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as exc:
                    future.set_exception(exc)

    def _admit(self, plan: StepPlan) -> None:
        """Retire and admit as the plan says (under the lock: `submit` counts free slots from len(self._active); a
        retired sequence has had its last event or, cancelled, needs none)."""
        self._active = [self._active[i] for i in plan.keep]
        if plan.admit:
            self._active += [self._pending[i] for i in plan.admit]
            admitted = set(plan.admit)
            self._pending = deque(s for i, s in enumerate(self._pending) if i not in admitted)

    def _fail_all(self, events: list, exc: Exception) -> bool:
        log.exception("decode step failed")
        failed, self._active = self._active, []
        self._deliver(events)
        self._fail([s for s in failed if s.finish is None], f"generation failed: {exc}")
        return True

    def _prefill(self, seq: Sequence_, slot: int, n: int, events: list) -> None:
        """Prefill the next n tokens of seq's prompt into its slot; at the prompt's end, sample its first token."""
        a = seq.written
        b = min(len(seq.prompt), a + n)
        ids = torch.tensor([seq.prompt[a:b]], dtype=torch.long, device=self.device)
        positions = torch.arange(a, b, device=self.device)[None]
        h = self.model.hidden_states(ids, positions, cache=self.cache.rows(slice(slot, slot + 1)))
        seq.written = b
        self.prompt_tokens += b - a
        if seq.params.prompt_logprobs is not None:  # position t's logits score token t + 1
            targets, k, rows = seq.prompt[a + 1:b + 1], seq.params.prompt_logprobs, PROMPT_LOGPROB_ROWS
            hs = h[0, : len(targets)]
            # a few positions' logits at a time: a whole long prompt's (T x vocab) would be the largest tensor
            seq.prompt_logprobs = [*(seq.prompt_logprobs or ()), *(lp for i in range(0, len(targets), rows)
                                   for lp in token_logprobs(self.model.logits(hs[i:i + rows])[:, : self.vocab],
                                                            targets[i:i + rows], k))]
        if b < len(seq.prompt) or seq.cancelled:
            return
        if seq.params.max_new_tokens == 0:
            seq.finish = "length"
            events.append((seq, Event(seq.index, finish_reason="length", prompt_logprobs=seq.prompt_logprobs)))
        else:
            self._sample([seq], self.model.logits(h[:, -1]), events)

    def _decode(self, plan: StepPlan, events: list) -> None:
        """One decode step of the plan's rows; a sequence that finished in this step's prefill sits it out."""
        running = self._active
        ready = [i for i in plan.decode if running[i].finish is None and not running[i].cancelled]
        if not ready:
            return
        # Rows that do not decode take a pad token: a free slot at position 0, which the next prefill of that slot
        # overwrites, and attends only to itself; a row still being prefilled at its next prompt position, which
        # its next chunk overwrites.
        b, rows = len(running), plan.rows
        last = [self.config.pad_id] * rows
        positions = [0] * rows
        for i, s in enumerate(running):
            positions[i] = s.written
        for i in ready:
            last[i] = running[i].tokens[-1]
        h = self.model.hidden_states(torch.tensor(last, device=self.device)[:, None],
                                     torch.tensor(positions, device=self.device)[:, None],
                                     cache=self.cache.rows(slice(0, rows)), n_keys=max(positions[:b]) + 1)
        h = h[:, -1] if len(ready) == rows else h[torch.tensor(ready, device=self.device), -1]
        logits = self.model.logits(h)
        self.decode_steps += 1
        decoding = [running[i] for i in ready]
        for s in decoding:
            s.written += 1
        self._sample(decoding, logits, events)

    @torch.inference_mode()
    def tune_step_rows(self, tolerance: float = 1.1) -> list[int]:
        """For each number of running sequences, how many cache rows a decode step should feed.

        Matrix-multiply libraries choose kernels by row count, and a step's time does not grow monotonically
        with its rows: more rows can be faster than fewer (benchmarks/README.md, "Decode step rows").
        So each candidate count is timed once (`time_step_rows`) and `pick_step_rows` pads a step up to a larger
        count when that is more than `tolerance` times faster. It writes to cache rows: the engine runs it before
        it serves anything.
        """
        return pick_step_rows(self.time_step_rows(), self.max_batch, tolerance)

    @torch.inference_mode()
    def time_step_rows(self) -> dict[int, float]:
        """Seconds of one decode step for each candidate row count (every count to 16, then multiples of 8)."""
        sizes = sorted({*range(1, min(16, self.max_batch) + 1), *range(8, self.max_batch + 1, 8), self.max_batch})
        times = dict.fromkeys(sizes, float("inf"))
        # the best of three rounds over every size: load from elsewhere only ever adds time, and a burst of it
        # lands on one round of many sizes rather than on every try of one
        for _ in range(3):
            for n in sizes:
                ids = torch.full((n, 1), self.config.pad_id, dtype=torch.long, device=self.device)
                zeros = torch.zeros((n, 1), dtype=torch.long, device=self.device)
                t0 = time.perf_counter()
                self.model.logits(self.model.hidden_states(ids, zeros, cache=self.cache.rows(slice(0, n)))).sum().item()
                times[n] = min(times[n], time.perf_counter() - t0)
        return times

    def _sample(self, seqs: list[Sequence_], logits: torch.Tensor, events: list) -> None:
        logits = logits[:, : self.vocab]
        # one batched choice and one device-to-host copy for every row
        batch = SamplingBatch([s.params for s in seqs], [s.generator for s in seqs],
                              histories=[(s.prompt, s.tokens) for s in seqs], matchers=[s.matcher for s in seqs])
        tokens = sample_batch(logits, batch).tolist()
        for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            if seq.params.logprobs is not None:
                seq.logprobs += token_logprobs(logits[i:i + 1], [token], seq.params.logprobs)
            if seq.matcher is not None:
                seq.matcher.accept(token)
            self._accept(seq, token, events)

    def _accept(self, seq: Sequence_, token: int, events: list) -> None:
        seq.tokens.append(token)
        self.completion_tokens += 1
        now = time.monotonic()
        for observe in self.token_observers:
            observe(len(seq.tokens) == 1, now - seq.at)
        seq.at = now
        text = seq.rule.push(token)  # the rule generate() applies: stop ids, stop strings, length
        seq.finish = seq.rule.finish
        if seq.finish == "stop" and token in seq.rule.stop_ids and seq.logprobs:
            seq.logprobs.pop()  # the stop token is not part of the text, nor of its log-probabilities
        if text or seq.finish:
            events.append((seq, Event(seq.index, text, seq.finish, len(seq.tokens),
                                      logprobs=seq.logprobs if seq.params.logprobs is not None else None,
                                      prompt_logprobs=seq.prompt_logprobs)))
            seq.logprobs, seq.prompt_logprobs = [], None

    def _move_row(self, src: int, dst: int, n: int) -> None:
        """Copy cache row `src`'s first n positions into row `dst` (a tensor-parallel engine does it on every rank)."""
        move_cache_row(self.cache, src, dst, n)

    def _fail(self, seqs: Iterable[Sequence_], message: str) -> None:
        self._deliver([(s, Event(s.index, error=message, completion_tokens=len(s.tokens))) for s in seqs])

    @staticmethod
    def _deliver(events: list[tuple[Sequence_, Event]]) -> None:
        # One wake-up of each event loop per step, not one per token.
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for seq, event in events:
            if not seq.cancelled:
                by_loop[seq.sink.loop].append((seq.sink.queue, event))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed: nobody is waiting for these events
                pass


def pick_step_rows(times: dict[int, float], max_batch: int, tolerance: float = 1.1) -> list[int]:
    """Rows a decode step of b running sequences feeds, for b = 0..max_batch, from each candidate count's step time.

    b steps with the smallest candidate count >= b, unless a larger one is more than `tolerance` times faster.
    """
    rows = [0]
    for b in range(1, max_batch + 1):
        fits = [n for n in times if n >= b]
        own, fastest = min(fits), min(fits, key=times.__getitem__)
        rows.append(own if times[own] <= tolerance * times[fastest] else fastest)
    return rows


def move_cache_row(cache: KVCache, src: int, dst: int, n: int) -> None:
    """Copy row `src`'s first n cached positions into row `dst`, in every layer."""
    for k, v in zip(cache.k, cache.v, strict=True):
        k[dst, :, :n] = k[src, :, :n]
        v[dst, :, :n] = v[src, :, :n]


def _put_all(items: list[tuple[asyncio.Queue, Event]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


async def events_of(sink: Sink, n: int) -> AsyncIterator[Event]:
    """The events of n sequences submitted with `sink`, until each has finished."""
    while n:
        event = await sink.queue.get()
        n -= event.finish_reason is not None or event.error is not None
        yield event


def auto_max_batch(model: LanguageModel, free_bytes: int | None = None) -> int:
    """The default batch: AUTO_MAX_BATCH slots, fewer when their KV cache (every row at max_seq_len) would take
    more than AUTO_CACHE_SHARE of the free memory of the model's device (`free_bytes` when given)."""
    cfg, weight = model.config, model.embed_tokens.weight
    row = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.max_seq_len * cfg.head_dim * weight.element_size()
    if free_bytes is None:
        if weight.device.type == "cuda":
            free_bytes = torch.cuda.mem_get_info(weight.device)[0]
        else:
            free_bytes = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(1, min(AUTO_MAX_BATCH, int(AUTO_CACHE_SHARE * free_bytes) // row))


def load_engine(checkpoint: str | os.PathLike, options: EngineOptions | None = None) -> tuple[Engine, dict]:
    """(engine, config dict) for a checkpoint folder; not started yet."""
    options = options or EngineOptions()
    model, tokenizer, config = load_checkpoint(checkpoint, device=options.device, dtype=DTYPES[options.dtype])
    return Engine(runtime_layout(model, options), tokenizer, options), config


def runtime_layout(model: nn.Module, options: EngineOptions) -> nn.Module:
    """The model with the weight layouts `options` ask for (fused projections, column-major weights), in place."""
    if options.fuse and all(type(b.get_submodule(p)) is nn.Linear for b in model.layers if isinstance(b, Block)
                            for p in FUSED_PARTS):  # int8 and low-rank projections stay as they are
        fuse_projections(model)
    weight = model.embed_tokens.weight
    if options.weight_layout == "columns" or (options.weight_layout == "auto" and weight.dtype == torch.float32
                                              and weight.device.type == "cpu"):
        column_major(model)
    return model


def column_major(model: nn.Module) -> nn.Module:
    """Store every weight matrix of linear and embedding layers column-major, in place: the same tensor values and
    shapes (state dicts and results keep them), each the transpose of a contiguous (in, out) matrix.

    A decode step multiplies a few rows by every weight; on CPUs torch's float32 `x @ W.T` runs faster when W.T is
    contiguous than when W is, the output layer most (benchmarks/README.md, "Weight layout").
    """
    for module in model.modules():
        if type(module) in (nn.Linear, nn.Embedding) and module.weight.dim() == 2:
            module.weight.data = module.weight.data.t().contiguous().t()
    return model
