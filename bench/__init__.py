"""bench: a reproducible benchmark suite and leaderboard for model compression and acceleration methods."""

__version__ = "0.1.0"
