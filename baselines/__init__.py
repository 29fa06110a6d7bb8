"""Registered methods, one module each, grouped by family: distillation/, caching/, pruning/, decoding/."""
