"""Text generation: prefill once, then decode one token at a time against a preallocated KV cache."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from palmkit.checkpoint import load_checkpoint
from palmkit.model import KVCache, PaLM
from palmkit.tokenizer import Tokenizer


@dataclass
class SamplingParams:
    """How to pick each next token; temperature 0 is greedy."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # nucleus sampling mass; 1.0: no cut
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and self.temperature < float("inf")):  # also rejects NaN
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)


@dataclass
class Completion:
    """One finished generation."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


@dataclass
class _Row:
    params: SamplingParams
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    done: bool = False


def make_generator(seed: int | None, device="cpu") -> torch.Generator | None:
    """A private RNG per request, so that a seeded request gives the same text whatever else runs."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """Pick one token id from a row of logits (V,)."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class TextStream:
    """Turns a growing list of token ids into safe text deltas.

    Holds back an incomplete UTF-8 character (byte-fallback pieces arrive one byte at a time) and any
    tail that could still become a stop string, and reports when a stop string completes.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return text that is now safe to show."""
        self.ids.append(token_id)
        return self._emit(final=False)

    def finish(self) -> str:
        """Flush what was held back at the end of generation."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids)
        for s in self.stop:
            at = text.find(s, self.sent)
            if at != -1:
                self.stopped = True
                delta, self.sent = text[self.sent:at], at
                return delta
        end = len(text)
        if not final:
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1  # an incomplete multi-byte character: wait for its next byte
            hold = 0
            for s in self.stop:
                for k in range(min(len(s) - 1, end - self.sent), 0, -1):
                    if text.endswith(s[:k], 0, end):
                        hold = max(hold, k)
                        break
            end -= hold
        delta, self.sent = text[self.sent:end], end
        return delta

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids)[: self.sent] if self.stopped else self.tokenizer.decode(self.ids)


@torch.inference_mode()
def generate_ids(model: PaLM, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 ) -> Iterator[list[int | None]]:
    """Yield, each step, the new token of every row (None for rows that have finished).

    Prompts of unequal length are right-padded; every row has its own positions, so a row's result
    does not depend on the others in the batch.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    per_row = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    ctx = model.config.max_seq_len
    longest = max(len(p) for p in prompts)
    if longest >= ctx:
        raise ValueError(f"prompt of {longest} tokens does not fit the context of {ctx} tokens")
    device = model.embed_tokens.weight.device
    budget = max(p.max_new_tokens for p in per_row)
    cache_len = min(ctx, longest + budget)
    cache = KVCache(model.config, len(prompts), cache_len, model.embed_tokens.weight.dtype, device)
    rows = [_Row(p, make_generator(p.seed)) for p in per_row]
    pad = model.config.pad_id
    # One host-to-device copy for the whole batch, not one per row.
    batch = torch.tensor([[*p, *[pad] * (longest - len(p))] for p in prompts], dtype=torch.long, device=device)
    positions = torch.arange(longest, device=device).expand(len(prompts), longest)
    h = model.hidden_states(batch, positions, cache=cache, n_keys=longest)
    last_index = torch.tensor([len(p) - 1 for p in prompts], device=device)
    logits = model.logits(h[torch.arange(len(prompts), device=device), last_index])
    # Positions live on the host: reading them from a device tensor would sync once per row per step (issue 2).
    pos = [len(p) for p in prompts]
    any_greedy = any(p.temperature == 0 for p in per_row)
    while True:
        # Greedy rows share one argmax and one device-to-host copy (the same ids as sample() row by row).
        greedy = logits.argmax(-1).tolist() if any_greedy else None
        step: list[int | None] = []
        for i, row in enumerate(rows):
            if row.done:
                step.append(None)
                continue
            tok = greedy[i] if row.params.temperature == 0 else sample(logits[i], row.params, row.generator)
            row.tokens.append(tok)
            row.done = ((row.params.stop_at_eos and tok == model.config.eos_id)
                        or len(row.tokens) >= row.params.max_new_tokens or pos[i] >= cache_len)
            step.append(tok)
        if all(t is None for t in step):
            return
        stop_now = yield step
        if stop_now:  # the caller may send indexes of rows to finish early (stop strings, disconnects)
            for i in stop_now:
                rows[i].done = True
        if all(r.done for r in rows):
            return
        last = torch.tensor([[r.tokens[-1] if r.tokens else pad] for r in rows], device=device)
        pos_in = [min(q, cache_len - 1) for q in pos]
        h = model.hidden_states(last, torch.tensor(pos_in, device=device)[:, None], cache=cache,
                                n_keys=max(pos_in) + 1)
        logits = model.logits(h[:, -1])
        pos = [q + 1 for q in pos]


def generate(model: PaLM, tokenizer: Tokenizer, prompts: str | Sequence[str],
             params: SamplingParams | None = None) -> list[Completion]:
    """Complete each prompt; a batch of prompts of different lengths runs together."""
    params = params or SamplingParams()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    encoded = [tokenizer.encode(p, bos=True) for p in prompts]
    streams = [TextStream(tokenizer, params.stop) for _ in prompts]
    finish = ["length"] * len(prompts)
    gen = generate_ids(model, encoded, params)
    to_stop: list[int] = []
    try:
        step = gen.send(None)
        while True:
            to_stop = []
            for i, tok in enumerate(step):
                if tok is None:
                    continue
                if params.stop_at_eos and tok == tokenizer.eos_id:
                    finish[i] = "stop"
                    continue
                streams[i].push(tok)
                if streams[i].stopped:
                    finish[i] = "stop"
                    to_stop.append(i)
            step = gen.send(to_stop)
    except StopIteration:
        pass
    out = []
    for i, s in enumerate(streams):
        s.finish()
        out.append(Completion(s.text, s.ids, len(encoded[i]), finish[i]))
    return out


def stream_to(model: PaLM, tokenizer: Tokenizer, prompt: str, params: SamplingParams, out=sys.stdout) -> Completion:
    """Generate for one prompt, writing text to `out` as it is produced."""
    encoded = tokenizer.encode(prompt, bos=True)
    stream = TextStream(tokenizer, params.stop)
    finish = "length"
    for (tok,) in generate_ids(model, [encoded], params):
        if tok is None:
            break
        if params.stop_at_eos and tok == tokenizer.eos_id:
            finish = "stop"
            break
        out.write(stream.push(tok))
        out.flush()
        if stream.stopped:
            finish = "stop"
            break
    out.write(stream.finish())
    out.flush()
    return Completion(stream.text, stream.ids, len(encoded), finish)


def generate_command(checkpoint: str, prompt: str, max_new_tokens: int = 128, temperature: float = 0.8,
                     top_k: int = 0, top_p: float = 0.95, seed: int | None = None, stop: list[str] | None = None,
                     device: str = "cpu") -> None:
    """Complete PROMPT with the model in CHECKPOINT, streaming text to the terminal."""
    model, tokenizer, _ = load_checkpoint(checkpoint, device=device)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, stop=tuple(stop or ()))
    sys.stdout.write(prompt)
    done = stream_to(model, tokenizer, prompt, params)
    sys.stdout.write(f"\n[{len(done.token_ids)} tokens, finish_reason={done.finish_reason}]\n")
