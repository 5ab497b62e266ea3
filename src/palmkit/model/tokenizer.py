"""A SentencePiece tokenizer trained the PaLM way (section 3, "Vocabulary").

Lossless: whitespace is kept as is, digits are split into single tokens, and anything outside the
vocabulary falls back to UTF-8 bytes, so decode(encode(text)) == text for every string.

The BOS rule: every sequence the model sees starts with BOS. A pretraining document is
`BOS text EOS` (palmkit.data.shards.encode_document), a prompt is `BOS text` (`encode_prompt`), a
conversation is `BOS` and its template (chat_template.encode_chat), and the exported tokenizer adds BOS
too (`add_bos_token`), so the same string gives the same ids in palmkit, in transformers and in the server.
A checkpoint records the rule in config.json (`tokenizer.add_bos`); `add_bos` below is that flag.
"""

from __future__ import annotations

import io
import itertools
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from palmkit.errors import PalmkitError
from palmkit.io import atomic_write_bytes

PAD, BOS, EOS, UNK = 0, 1, 2, 3


# Chat-template markers are whole pieces so that a role switch is one token, never split by text.
CHAT_SYMBOLS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

# The names of the special pieces; transformers reads them in any text as their tokens, SentencePiece does not.
SPECIAL_PIECES = ("<pad>", "<s>", "</s>", "<unk>")

# Text that must stay letters inside a chat message: `encode_plain` cuts each occurrence after its "<", so that
# neither SentencePiece (which matches the chat markers) nor transformers (which matches all of them) sees it.
_CONTROL_TEXT = re.compile("|".join(re.escape(s) for s in (*CHAT_SYMBOLS, *SPECIAL_PIECES)))


class Tokenizer:
    """Thin wrapper over a SentencePiece model file with palmkit's special ids."""

    def __init__(self, model_file: str | os.PathLike, add_bos: bool = True):
        path = Path(model_file)
        self.add_bos = add_bos  # the BOS rule the model was trained with (see the module docstring)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(path.read_bytes())
        except Exception as exc:  # sentencepiece raises a bare RuntimeError/OSError with a C++ message
            raise PalmkitError(f"corrupt tokenizer model {path}: {exc}") from None
        self.pad_id, self.bos_id, self.eos_id = self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def stop_ids(self) -> list[int]:
        """The ids that end a generation: EOS, and the chat template's end of turn (`<|end|>`) when the vocabulary
        has it. The export lists both as `eos_token_id`, so transformers stops where palmkit does."""
        end = self.sp.piece_to_id(CHAT_SYMBOLS[3])
        return [self.eos_id] + ([end] if end != self.sp.unk_id() else [])

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids for one string."""
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a prompt to complete: BOS first when the model was trained that way (`add_bos`)."""
        return self.encode(text, bos=self.add_bos)

    def encode_plain(self, text: str) -> list[int]:
        """Ids of text in which chat markers and special-piece names are letters, never control tokens.

        Message content goes through here, so that a user who types `<|system|>` cannot open a system turn.
        Each such name is encoded as "<" followed by the rest, the same cut the exported chat template makes.
        """
        cuts = [m.start() + 1 for m in _CONTROL_TEXT.finditer(text)]
        bounds = [0, *cuts, len(text)]
        return [i for a, b in itertools.pairwise(bounds) if b > a for i in self.sp.encode(text[a:b])]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids for many strings (SentencePiece encodes them in parallel threads)."""
        return self.sp.encode(list(texts), num_threads=os.cpu_count() or 1)

    def decode(self, ids: Iterable[int]) -> str:
        """Text for token ids; special ids are dropped."""
        specials = (self.pad_id, self.bos_id, self.eos_id)
        return self.sp.decode([int(i) for i in ids if int(i) not in specials])

    def piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)


def train_tokenizer(texts: Iterable[str], out_file: str | os.PathLike, vocab_size: int = 32000,
                    model_type: str = "bpe", character_coverage: float = 0.9995,
                    max_sentences: int = 2_000_000, seed: int = 0) -> Tokenizer:
    """Train a SentencePiece model on an iterable of lines and write it to `out_file`."""
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    lines = (t for t in texts if t.strip())
    model = io.BytesIO()
    # SentencePiece samples with its own RNG; seeding it keeps the vocabulary reproducible.
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_writer=model, vocab_size=vocab_size, model_type=model_type,
            character_coverage=character_coverage, byte_fallback=True, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_by_whitespace=True,
            pad_id=PAD, bos_id=BOS, eos_id=EOS, unk_id=UNK, user_defined_symbols=list(CHAT_SYMBOLS),
            input_sentence_size=max_sentences, shuffle_input_sentence=True, max_sentence_length=16384,
            required_chars="0123456789", hard_vocab_limit=False, num_threads=os.cpu_count() or 1, minloglevel=2,
        )
    except RuntimeError as exc:
        raise PalmkitError(f"tokenizer training failed: {exc}") from None
    atomic_write_bytes(out_file, model.getvalue())
    return Tokenizer(out_file)
