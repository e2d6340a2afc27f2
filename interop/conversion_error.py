"""The error of every Hugging Face conversion (GPT-2 and Llama, export and import)."""


class ConversionError(ValueError):
    """The model (or the Hugging Face config) has something the other side cannot express, or
    the directories are not as the conversion needs them; the message names it and what to do."""
