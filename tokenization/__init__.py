"""Tokenizers and GPT-2's tokenizer files; imports nothing from the project, so training,
data preparation and the Hugging Face interop all build on it."""
