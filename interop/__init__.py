"""Into and out of the ecosystem: Hugging Face ``transformers`` GPT-2 export and import, byte-level
BPE tokenizers, and reading a run's checkpoint history.

Nothing in training imports this package: it is for the scripts (``convert_checkpoint.py``,
``ckpt_history.py``, ``prepare_data.py``), and it needs the ``hf`` extra
(``pip install -e .[hf]``: transformers, safetensors, tokenizers) where it touches those libraries.
"""
