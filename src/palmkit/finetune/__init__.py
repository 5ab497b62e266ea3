"""Fine-tuning a pretrained PaLM: sequence classification, token classification (NER) and chat.

    palmkit finetune classify --checkpoint PRE --data.task sentiment-en --out runs/sst
    palmkit finetune ner --checkpoint PRE --data.task ner-zh --out runs/ner-zh --train.lora_rank 8
    palmkit finetune chat --checkpoint PRE --data.task dialogue-en --out runs/chat

Full fine-tuning or LoRA (model/lora.py). Every result is a plain checkpoint folder (`model.safetensors`,
`config.json`, `tokenizer.model`) that generate, export and serve load as usual; a classifier or tagger adds
`head.safetensors` and names its `task`, `labels` and `pooling` in config.json.
"""

from palmkit.finetune.chat import finetune_chat
from palmkit.finetune.classify import finetune_classify
from palmkit.finetune.fit import FinetuneConfig
from palmkit.finetune.ner import finetune_ner
from palmkit.finetune.predict import Classifier, Tagger, load_classifier, load_tagger

__all__ = ["Classifier", "FinetuneConfig", "Tagger", "finetune_chat", "finetune_classify", "finetune_ner",
           "load_classifier", "load_tagger"]
