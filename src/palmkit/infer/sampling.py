"""Sampling parameters and drawing one token: greedy, temperature, top-k, top-p, seeded generators; the
log-probabilities of tokens and their most likely alternatives."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from palmkit.errors import PalmkitError


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
    # Log-probabilities, of the model's own distribution (before temperature, top-k and top-p): None for none,
    # k >= 0 for each token's own and the k most likely alternatives'; of the generated tokens, and of the
    # prompt's tokens from the second on (the first has no context to be predicted from).
    logprobs: int | None = None
    prompt_logprobs: int | None = None

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


def make_generator(seed: int | None, device: str | torch.device) -> torch.Generator | None:
    """A private RNG per request, so that a seeded request gives the same text whatever else runs.

    `device` has no default: torch.multinomial draws only with a generator of the logits' device, and a CPU
    default once made every seeded request fail on a GPU.
    """
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
