"""Per-request controls applied to a step's logits (B, V) before a token is drawn: the grammar mask, penalties
on what was already said, logit_bias, and min-p after temperature.

The definitions are the ones clients expect from vLLM and OpenAI:
- repetition_penalty r (Keskar et al. 2019, CTRL, section 4.1; transformers' RepetitionPenaltyLogitsProcessor):
  every token of the prompt or the output so far has its logit divided by r when positive, multiplied when not;
- presence_penalty p and frequency_penalty f (OpenAI): logit -= p * [count > 0] + f * count, over the output's
  own tokens only;
- logit_bias (OpenAI): added to the logits of the ids it names;
- min_p m (Nguyen et al. 2024, "min-p sampling"; transformers' MinPLogitsWarper): after temperature, tokens whose
  probability is below m times the most likely token's are dropped.
The grammar mask (infer/grammar.py) comes first, then the penalties and the bias on the raw logits, so that greedy
requests are penalised too (as vLLM does); temperature, min-p, top-k and top-p follow in the sampler. Rows without
any control are left untouched and cost nothing: `active` says whether a batch needs this module at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from palmkit.infer.grammar import Matcher, apply_bitmask, new_bitmask


def has_penalties(params) -> bool:
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
            or bool(params.logit_bias))


def active(params: Sequence, matchers: Sequence[Matcher | None]) -> bool:
    """Whether any row of a step needs a control before sampling."""
    return any(m is not None for m in matchers) or any(has_penalties(p) or p.min_p > 0 for p in params)


def apply_grammar(logits: torch.Tensor, matchers: Sequence[Matcher | None]) -> torch.Tensor:
    """-inf on every token a row's grammar does not allow next (rows without a matcher untouched)."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    mask = new_bitmask(len(rows), max(vocab, *(matchers[i].vocab for i in rows)))
    for k, i in enumerate(rows):
        matchers[i].fill_mask(mask, k)
    index = torch.tensor(rows, device=logits.device)
    logits[index] = apply_bitmask(logits[index], mask[:, : (vocab + 31) // 32])
    return logits


def penalize(logits: torch.Tensor, params, prompt: Sequence[int], output: Sequence[int]) -> torch.Tensor:
    """One row (V,) of float logits with its repetition, presence and frequency penalties and logit_bias applied."""
    if params.repetition_penalty != 1.0 and (prompt or output):
        seen = torch.tensor(sorted({*prompt, *output}), dtype=torch.long, device=logits.device)
        values = logits[seen]
        r = params.repetition_penalty
        logits[seen] = torch.where(values > 0, values / r, values * r)
    if (params.presence_penalty or params.frequency_penalty) and output:
        ids, counts = torch.tensor(list(output), dtype=torch.long, device=logits.device).unique(return_counts=True)
        logits[ids] -= params.presence_penalty + params.frequency_penalty * counts.to(logits.dtype)
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=logits.device)
        logits[ids] += torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype, device=logits.device)
    return logits


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Logits (..., V), already divided by the temperature, with every token less likely than min_p times the most
    likely one set to -inf."""
    probs = torch.softmax(logits, dim=-1)
    keep = probs >= min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(~keep, float("-inf"))
