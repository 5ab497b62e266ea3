"""The training layer: one optimisation step, distributed setup, training state, held-out evaluation, pretraining,
healing and metrics.
"""
