"""The pruning family of methods."""
