"""The caching family of methods."""
