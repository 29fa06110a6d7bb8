"""The quantization family of methods (shared pieces in `_quant`)."""
