"""Registered tasks, one module each."""
