"""The inference layer: sampling, static-batch generation with a KV cache, the continuous-batching engine."""
