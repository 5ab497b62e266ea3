"""The per-request sampling controls against references: transformers' logits processors (repetition penalty,
min-p) and hand computations of OpenAI's definitions (presence and frequency penalties, logit_bias)."""

from types import SimpleNamespace

import pytest
import torch

from palmkit.infer.logits_processors import active, min_p_filter, penalize

transformers = pytest.importorskip("transformers")

V = 50


def controls(**changes):
    base = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": None,
            "min_p": 0.0}
    return SimpleNamespace(**{**base, **changes})


def test_repetition_penalty_equals_transformers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(V, generator=g) * 3
    prompt, output = [1, 4, 4, 9], [9, 17, 3]
    ours = penalize(logits.clone(), controls(repetition_penalty=1.7), prompt, output)
    ref = transformers.RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + output]), logits[None].clone())[0]
    assert torch.allclose(ours, ref) and not torch.equal(ours, logits)


def test_presence_and_frequency_penalties_and_logit_bias_by_hand():
    logits = torch.linspace(-2, 2, V)
    output = [5, 5, 5, 8]
    ours = penalize(logits.clone(), controls(presence_penalty=0.5, frequency_penalty=0.25,
                                             logit_bias={8: -100.0, 30: 3.5}), prompt=[5, 40], output=output)
    want = logits.clone()
    want[5] -= 0.5 + 3 * 0.25  # present, three times
    want[8] -= 0.5 + 1 * 0.25 + 100.0
    want[30] += 3.5
    assert torch.allclose(ours, want)  # token 40 (prompt only) is not penalised: OpenAI counts the output


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_min_p_equals_transformers(min_p):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, V, generator=g) * 2 / 0.7  # after a temperature of 0.7
    ours = min_p_filter(logits, min_p)
    ref = transformers.MinPLogitsWarper(min_p)(torch.zeros(3, 1, dtype=torch.long), logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.equal(ours[~torch.isinf(ours)], logits[~torch.isinf(ours)])


def test_rows_without_controls_are_inactive():
    assert not active([controls(), controls()], [None, None])
    assert active([controls(), controls(min_p=0.1)], [None, None])
    assert active([controls()], [object()])


def test_the_batched_sampler_applies_them_per_row_and_leaves_its_input_alone():
    from palmkit.infer.sampling import SamplingBatch, SamplingParams, make_generator, sample_batch

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, V, generator=g) * 3
    kept = logits.clone()
    top = logits.argmax(-1)
    params = [SamplingParams(temperature=1.0, min_p=1.0, seed=0),  # only the most likely token survives min-p 1
              SamplingParams(temperature=0, logit_bias={int(top[1]): -100.0}),
              SamplingParams(temperature=0, repetition_penalty=1e6)]  # what was said can never be chosen again
    batch = SamplingBatch(params, [make_generator(p.seed, "cpu") for p in params],
                          histories=[((), ()), ((), ()), ([int(top[2])], [])])
    tokens = sample_batch(logits, batch)
    assert int(tokens[0]) == int(top[0])
    assert int(tokens[1]) == int(logits[1].topk(2).indices[1])
    assert int(tokens[2]) != int(top[2])
    assert torch.equal(logits, kept)  # the engine's logits stay the model's, for log-probabilities
