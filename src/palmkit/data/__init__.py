"""The data layer: pinned source packages, the pretraining corpus, token shards and the mixture loader, tasks."""
