"""The distillation family of methods."""
