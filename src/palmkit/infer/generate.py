"""Static-batch generation with a preallocated KV cache: one prefill, then decode steps."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from palmkit.errors import PalmkitError
from palmkit.infer.sampling import SamplingBatch, SamplingParams, make_generator, sample_batch
from palmkit.infer.stop import StopRule
from palmkit.model.palm import KVCache, PaLM
from palmkit.model.tokenizer import Tokenizer


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
    rule: StopRule
    tokens: list[int] = field(default_factory=list)
    done: bool = False


@torch.inference_mode()
def generate_ids(model: PaLM, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 ) -> Iterator[list[int | None]]:
    """Yield, each step, the new token of every row (None for rows that have finished).

    Prompts of unequal length are right-padded; every row has its own positions, so a row's result
    does not depend on the others in the batch.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise PalmkitError("every prompt needs at least one token")
    per_row = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    ctx = model.config.max_seq_len
    longest = max(len(p) for p in prompts)
    if longest >= ctx:
        raise PalmkitError(f"prompt of {longest} tokens does not fit the context of {ctx} tokens")
    device = model.embed_tokens.weight.device
    budget = max(p.max_new_tokens for p in per_row)
    cache_len = min(ctx, longest + budget)
    cache = KVCache(model.config, len(prompts), cache_len, model.embed_tokens.weight.dtype, device)
    # The generator lives where the logits are: torch.multinomial draws with a generator of their device.
    rows = [_Row(p, make_generator(p.seed, device), StopRule(p, model.config.eos_id, len(prompt), ctx))
            for p, prompt in zip(per_row, prompts, strict=True)]
    pad = model.config.pad_id
    # One host-to-device copy for the whole batch, not one per row.
    batch = torch.tensor([[*p, *[pad] * (longest - len(p))] for p in prompts], dtype=torch.long, device=device)
    positions = torch.arange(longest, device=device).expand(len(prompts), longest)
    h = model.hidden_states(batch, positions, cache=cache, n_keys=longest)
    last_index = torch.tensor([len(p) - 1 for p in prompts], device=device)
    logits = model.logits(h[torch.arange(len(prompts), device=device), last_index])
    # Positions live on the host: reading them from a device tensor would sync once per row per step.
    pos = [len(p) for p in prompts]
    batch = SamplingBatch(per_row, [r.generator for r in rows])
    while True:
        # one batched choice and one device-to-host copy for every row (finished rows' draws are not used)
        chosen = sample_batch(logits, batch).tolist()
        step: list[int | None] = []
        for row, tok in zip(rows, chosen, strict=True):
            if row.done:
                step.append(None)
                continue
            row.tokens.append(tok)
            row.rule.push(tok)
            row.done = row.rule.finish is not None
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
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return complete_ids(model, tokenizer, [tokenizer.encode_prompt(p) for p in prompts], params)


def complete_ids(model: PaLM, tokenizer: Tokenizer, encoded: Sequence[list[int]],
                 params: SamplingParams | None = None) -> list[Completion]:
    """`generate` for prompts already encoded (e.g. a conversation by `encode_chat`), with the text rules."""
    params = params or SamplingParams()
    # generate_ids stops rows by the token rules alone; the same rules with the text also catch stop strings
    rules = [_text_rule(model, tokenizer, ids, params) for ids in encoded]
    gen = generate_ids(model, encoded, params)
    try:
        step = gen.send(None)
        while True:
            for rule, tok in zip(rules, step, strict=True):
                if tok is not None:
                    rule.push(tok)
            step = gen.send([i for i, rule in enumerate(rules) if rule.finish])
    except StopIteration:
        pass
    out = []
    for ids, rule in zip(encoded, rules, strict=True):
        rule.stream.finish()
        out.append(Completion(rule.stream.text, rule.stream.ids, len(ids), rule.finish))
    return out


def _text_rule(model: PaLM, tokenizer: Tokenizer, prompt: list[int], params: SamplingParams) -> StopRule:
    return StopRule(params, model.config.eos_id, len(prompt), model.config.max_seq_len, tokenizer)


def stream_to(model: PaLM, tokenizer: Tokenizer, prompt: str, params: SamplingParams, out=sys.stdout) -> Completion:
    """Generate for one prompt, writing text to `out` as it is produced."""
    encoded = tokenizer.encode_prompt(prompt)
    rule = _text_rule(model, tokenizer, encoded, params)
    for (tok,) in generate_ids(model, [encoded], params):
        out.write(rule.push(tok))
        out.flush()
        if rule.finish:
            break
    out.write(rule.stream.finish())
    out.flush()
    return Completion(rule.stream.text, rule.stream.ids, len(encoded), rule.finish)
