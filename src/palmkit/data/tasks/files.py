"""Where a fine-tuning command's examples come from: a built-in task, or the user's own files (`TaskFiles`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from palmkit.data.tasks.registry import load_task
from palmkit.data.tasks.splits import TaskData
from palmkit.data.tasks.user import load_user_task
from palmkit.errors import PalmkitError

# config.json's "data_files" keys (what evaluate reads back) for the fields of TaskFiles
_RECORD_KEYS = {"train_file": "train", "valid_file": "valid", "test_file": "test", "text_field": "text_field",
                "label_field": "label_field", "label_names": "label_names"}


@dataclass(frozen=True)
class TaskFiles:
    """The examples to learn from: a built-in task, or your own files (the fields a task does not read are
    ignored: chat reads task, train_file and valid_file)."""

    task: str = ""
    """a built-in task (sentiment-en, sentiment-fr, sentiment-de, sentiment-zh, tweets-en; ner-en, ner-zh, ner-ja;
    dialogue-en), or give train_file instead"""
    train_file: str = ""
    """your own examples: CSV, JSONL, a JSON array of records or Parquet; classification: a text and a label per
    record; NER: CoNLL (word and tag columns) or {"tokens": [...], "tags": [...]}; chat: {"messages": [{"role": ...,
    "content": ...}, ...]} or TRL's {"prompt": ..., "completion": ...} (strings, or lists of messages)"""
    valid_file: str = ""
    """validation examples (default: a seeded 10% of train_file)"""
    test_file: str = ""
    """test examples for `palmkit evaluate` (default: a seeded 10% of train_file)"""
    text_field: str = "text"
    """the CSV column or JSON key of the text (classification)"""
    label_field: str = ""
    """the CSV column or JSON key of the label; default: label (classification), tags (NER; ner_tags in Hugging
    Face datasets)"""
    label_names: list[str] | str = ""
    """where labels (or tags) are numbers, the name of each, in order (a list, or one comma-separated string):
    the classes get these names and this order"""

    def load(self, kind: str, seed: int = 0) -> TaskData:
        """The task's examples, split into train/valid/test (seeded), checked to be a `kind` task."""
        if bool(self.task) == bool(self.train_file):
            raise PalmkitError("give either --data.task (a built-in task) or --data.train_file (your own data)")
        data = load_task(self.task, seed=seed) if self.task else load_user_task(
            kind, self.train_file, self.valid_file, self.test_file, self.text_field, self.label_field, seed,
            label_names=self.label_names)
        if data.kind != kind:
            raise PalmkitError(f"task {data.name} is a {data.kind} task, not {kind}")
        return data

    def record(self) -> dict:
        """What a tuned checkpoint's config.json records of the user's files (paths made absolute), so that
        `palmkit evaluate` rebuilds the same splits; {} for a built-in task."""
        if self.task:
            return {}
        paths = ("train_file", "valid_file", "test_file")
        return {key: str(Path(getattr(self, name)).resolve()) if name in paths else getattr(self, name)
                for name, key in _RECORD_KEYS.items() if getattr(self, name)}

    @staticmethod
    def from_record(files: dict) -> TaskFiles:
        """The options `record` wrote."""
        return TaskFiles(**{name: files[key] for name, key in _RECORD_KEYS.items() if key in files})
