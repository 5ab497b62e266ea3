"""The model layer: the PaLM module, its loss, tokenizer, chat template, alternative linear layers (fused,
int8, low-rank, oneDNN-packed, LoRA), the one state-dict adapter, checkpoints and export.
"""
