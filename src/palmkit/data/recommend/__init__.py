"""User behaviour with item text: MovieLens 100K (ratings, movie titles, years, genres) and its temporal split."""

from palmkit.data.recommend.movielens import MOVIELENS, Movie, Rating, load_movielens, read_items, read_ratings
from palmkit.data.recommend.split import FeedbackSplit, implicit_feedback, temporal_split

__all__ = ["MOVIELENS", "FeedbackSplit", "Movie", "Rating", "implicit_feedback", "load_movielens", "read_items",
           "read_ratings", "temporal_split"]
