"""Quantization numerics (fake-quant, quantize/dequantize) and byte packing; see FORMATS.md."""
