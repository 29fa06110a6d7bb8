"""The decoding family of methods."""
