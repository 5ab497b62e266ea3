"""The inference layer: everything that turns a model and a prompt into tokens, without HTTP.

- `sampling`: sampling parameters and the batched draw of every row's next token; `logits_processors`: the
  per-request controls applied to a step's logits (grammar mask, penalties, logit bias, min-p); `grammar`:
  structured-output constraints compiled by llguidance; `stop`: when a sequence ends; `text_stream`: incremental
  detokenisation with stop strings.
- `generate`: static-batch generation with a preallocated KV cache; `choices`: multiple choice by log-likelihood;
  `embeddings`: mean-pooled text embeddings.
- `interface`: the model Protocol the engine needs; `scheduler`: the engine's planner (what one step does, decided
  without a model); `engine`: the continuous-batching executor that serves `palmkit serve`.
- `tensor_parallel`: one model split over processes (torch.distributed.tensor.parallel); `sharded`: a large input
  file split over processes (`torchrun ... classify|tag|generate --input`).
"""
