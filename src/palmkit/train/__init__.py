"""The training layer: the engine every training loop runs on (engine.py: device, dtype, DDP/FSDP2, one step over
a global batch, the LR schedule, the budget clock), its checkpoints (state.py), pretraining and healing on it,
held-out evaluation and metrics.
"""
