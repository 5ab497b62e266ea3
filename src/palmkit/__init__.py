"""palmkit: build, train, fine-tune and serve PaLM-style language models end to end.

The names below are the public API; each is imported on first use (PEP 562), so that `import palmkit.errors`
and `palmkit --help` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "PaLM": "palmkit.model.palm",
    "ModelConfig": "palmkit.model.palm",
    "preset": "palmkit.model.palm",
    "Tokenizer": "palmkit.model.tokenizer",
    "load_checkpoint": "palmkit.model.checkpoint",
    "save_checkpoint": "palmkit.model.checkpoint",
    "generate": "palmkit.infer.generate",
    "SamplingParams": "palmkit.infer.sampling",
}

__all__ = ["ModelConfig", "PaLM", "SamplingParams", "Tokenizer", "__version__", "generate", "load_checkpoint",
           "preset", "save_checkpoint"]

if TYPE_CHECKING:
    from palmkit.infer.generate import generate
    from palmkit.infer.sampling import SamplingParams
    from palmkit.model.checkpoint import load_checkpoint, save_checkpoint
    from palmkit.model.palm import ModelConfig, PaLM, preset
    from palmkit.model.tokenizer import Tokenizer


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'palmkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
