"""Hugging Face Gemma 4 interchange.

  layout.py    config.json ⇄ ModelConfig and HF tensor names/shapes ⇄ our tree, one table both ways
  importer.py  an HF folder (config.json + safetensors) → our config and parameter tree

The exporters (export/) write HF names through layout.py too, so import and export cannot drift apart.
"""
