"""The OpenAI-compatible HTTP server over the inference engine.

- `app`: the app factory and `palmkit serve`; `state`: what the routes share; `guard`, `connections`, `limits`:
  the cheap checks every request passes before any work (host, key, size, per-client bounds, connection caps).
- `protocol`: the OpenAI wire format (request bodies, errors); `openai`: `/v1/completions`,
  `/v1/chat/completions`, `/v1/models`; `logprobs`: log-probabilities in OpenAI's shapes; `structured`: a
  request's structured-output fields as one grammar; `tools`: tool calling in chat.
- `embeddings`: `/v1/embeddings`; `tokenize`: `/tokenize` and `/detokenize`; `classify`: `/v1/classify`;
  `recommend`: `/v1/recommend`; `grounding`: FAQ grounding for `--faq`.
- `schema`: the OpenAPI document; `metrics`: Prometheus metrics.
"""

from palmkit.infer.engine import Engine
from palmkit.serve.app import create_app, serve

__all__ = ["Engine", "create_app", "serve"]
