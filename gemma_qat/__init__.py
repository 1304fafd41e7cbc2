"""Quantization-aware training of Gemma 4 in JAX/Flax.

Packages, lowest layer first; each imports only from those before it (README.md, "Layout"):
devices.py and sharding.py (what the process runs on, the mesh), model/ (the decoder, its parameters
and their folder on disk), data/, hf/ (Hugging Face interchange), quant/ (formats, recipes, fake-quant),
loss/ (chunked distillation losses), export/, train/, eval/, preflight/, and cli/ (the command line).
"""
