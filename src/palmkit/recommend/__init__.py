"""Recommendation from user behaviour and item text: a collaborative retriever (ALS), a language-model scorer
fine-tuned on (history text, candidate text) pairs, their learned combination, full-ranking metrics.

    palmkit recipe recommend [--checkpoint BASE]      # data, tuning, evaluation, a recommender folder
    palmkit recommend --checkpoint DIR --user 196     # a user's top 10 with the likes they came from
"""
