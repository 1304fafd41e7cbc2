"""Thin wiring from configs to the gemma_qat library: train, export, evaluate, demo."""
