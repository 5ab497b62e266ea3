"""Sampling parameters and drawing the next token of every row of a batch at once: greedy, temperature, top-k,
top-p, a seeded generator per request; the log-probabilities of tokens and their most likely alternatives."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from palmkit.errors import PalmkitError
from palmkit.infer.grammar import Constraint, Matcher
from palmkit.infer.logits_processors import active, apply_grammar, has_penalties, min_p_filter, penalize


@dataclass
class SamplingParams:
    """How to pick each next token; temperature 0 is greedy."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # nucleus sampling mass; 1.0: no cut
    seed: int | None = None
    stop: Sequence[str] | str = ()  # one stop string or several; one becomes a 1-tuple
    stop_at_eos: bool = True
    # Log-probabilities, of the model's own distribution (before temperature, top-k and top-p): None for none,
    # k >= 0 for each token's own and the k most likely alternatives'; of the generated tokens, and of the
    # prompt's tokens from the second on (the first has no context to be predicted from).
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # Per-request controls (infer/logits_processors.py has their definitions): min-p after temperature, penalties
    # on what was already said (1.0 and 0.0: off), a bias per token id, and a grammar the output must match
    # (infer/grammar.py). Only the serving engine applies penalties and grammars: it knows each row's history.
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    constraint: Constraint | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and self.temperature < float("inf")):  # also rejects NaN
            raise PalmkitError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PalmkitError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise PalmkitError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 0:
            raise PalmkitError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise PalmkitError(f"{name} must be None or >= 0, got {getattr(self, name)}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not 0 <= self.min_p <= 1 or not self.repetition_penalty > 0:
            raise PalmkitError(f"need 0 <= min_p <= 1 and repetition_penalty > 0, got {self.min_p} and "
                               f"{self.repetition_penalty}")


def make_generator(seed: int | None, device: str | torch.device) -> torch.Generator | None:
    """A private RNG per request, so that a seeded request gives the same text whatever else runs.

    `device` has no default: a draw takes a generator of the logits' device, and a CPU default once made every
    seeded request fail on a GPU.
    """
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


@dataclass
class SamplingBatch:
    """The sampling rules of a batch: row i of the logits is drawn by `params[i]` with `generators[i]`.

    `process` is the one place where each row's logits are changed before any choice (greedy or sampled) is made:
    per-row logits processors and [B, V] additive masks belong there.
    """

    params: Sequence[SamplingParams]
    generators: Sequence[torch.Generator | None]
    # each row's (prompt, output so far), for the penalties; its grammar's matcher (None: unconstrained)
    histories: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None
    matchers: Sequence[Matcher | None] | None = None

    def __post_init__(self) -> None:
        if len(self.params) != len(self.generators):
            raise PalmkitError(f"{len(self.params)} rows of parameters for {len(self.generators)} generators")
        if self.matchers is None:
            self.matchers = [None] * len(self.params)

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits (B, V) each row's choice is made from: the grammar's mask, then the penalties and the bias
        (a copy when any row has one: the caller's logits stay the model's own, for log-probabilities)."""
        if not active(self.params, self.matchers):
            return logits
        logits = apply_grammar(logits.clone(), self.matchers)
        for i, p in enumerate(self.params):
            if has_penalties(p):
                prompt, output = self.histories[i] if self.histories is not None else ((), ())
                penalize(logits[i], p, prompt, output)
        return logits

    def uniforms(self, rows: Sequence[int], device: torch.device) -> torch.Tensor:
        """One draw in [0, 1) for each of `rows`, from that row's own generator (the global one if it has none)."""
        return torch.cat([torch.rand(1, generator=self.generators[i], device=device) for i in rows])


def sample_batch(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The next token id (B,) of every row of logits (B, V): greedy rows by argmax, the others drawn.

    A sampled row takes one uniform u from its own generator and picks, by inverse CDF, the first token whose
    cumulative probability (in vocabulary order, after temperature, top-k and top-p) exceeds u: a row's token
    depends on its logits, its parameters and its own generator only, never on the other rows of the batch.
    """
    logits = batch.process(logits.float())  # fp32: a bfloat16 argmax is several times slower on CPUs
    tokens = logits.argmax(-1)
    drawn = [i for i, p in enumerate(batch.params) if p.temperature > 0]
    if not drawn:
        return tokens
    device = logits.device
    index = torch.tensor(drawn, device=device)
    temperature = torch.tensor([batch.params[i].temperature for i in drawn], device=device)
    scaled = logits[index] / temperature[:, None]
    for r, i in enumerate(drawn):
        if batch.params[i].min_p > 0:  # min-p after temperature (logits_processors.min_p_filter)
            scaled[r] = min_p_filter(scaled[r], batch.params[i].min_p)
    cut = [r for r, i in enumerate(drawn) if batch.params[i].top_k or batch.params[i].top_p < 1]
    if cut:
        scaled[cut] = _cut(scaled[cut], [batch.params[drawn[r]] for r in cut])
    probs = torch.softmax(scaled, dim=-1)
    # float64: a 32k-token float32 running sum drifts by up to ~1e-3, which would bias the draw
    cdf = probs.double().cumsum(-1)
    u = batch.uniforms(drawn, device).double() * cdf[:, -1]
    picked = torch.searchsorted(cdf, u[:, None], right=True)[:, 0]
    # u * total can round up to the total itself: take the most likely token then (probability ~1e-16)
    picked = torch.where(picked < probs.shape[-1], picked, probs.argmax(-1))
    return tokens.index_copy(0, index, picked)


def _cut(scaled: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Rows of temperature-scaled logits with the tokens outside top-k and then top-p set to -inf.

    Each row keeps the tokens at least as likely as its cut-off token (ties at the cut-off are all kept): top-k's
    k-th most likely, and top-p's smallest prefix of the most likely whose mass reaches top_p (the first always
    kept), renormalised after top-k as when the two are applied one after the other.
    """
    vocab = scaled.shape[-1]
    ordered = scaled.sort(dim=-1, descending=True, stable=True).values
    k = torch.tensor([min(p.top_k, vocab) if p.top_k else vocab for p in params], device=scaled.device)
    top_p = torch.tensor([p.top_p for p in params], device=scaled.device)
    rank = torch.arange(vocab, device=scaled.device)
    ordered = ordered.masked_fill(rank >= k[:, None], float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    kept = ((probs.cumsum(-1) - probs) < top_p[:, None]) & (rank < k[:, None])
    kept[:, 0] = True
    last = kept.sum(-1, keepdim=True) - 1  # kept is a prefix: its length minus one is the cut-off rank
    threshold = ordered.gather(-1, last)
    return scaled.masked_fill(scaled < threshold, float("-inf"))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """Pick one token id from a row of logits (V,): `sample_batch` for one row."""
    return int(sample_batch(logits[None], SamplingBatch([params], [generator]))[0])


@dataclass
class TokenLogprob:
    """One token's log-probability under the model and the `k` most likely ids at its position."""

    id: int
    logprob: float
    top: list[tuple[int, float]]  # (id, log-probability), most likely first


def token_logprobs(logits: torch.Tensor, ids: Sequence[int], k: int = 0) -> list[TokenLogprob]:
    """The log-probability of ids[t] under logits[t] (T, V) for every t, with the k most likely ids at t."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, torch.tensor(ids, dtype=torch.long, device=logp.device)[:, None])[:, 0].tolist()
    if not k:
        return [TokenLogprob(i, lp, []) for i, lp in zip(ids, chosen, strict=True)]
    values, indices = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return [TokenLogprob(i, lp, list(zip(ti, tv, strict=True)))
            for i, lp, ti, tv in zip(ids, chosen, indices.tolist(), values.tolist(), strict=True)]
