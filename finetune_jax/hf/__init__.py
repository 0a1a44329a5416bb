"""Reading and writing model files: HF directories, safetensors, GGUF, exports, adapters.

Imports the models (for their HF mappings), never training or data code."""
