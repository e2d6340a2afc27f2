#!/usr/bin/env python
"""Make an indexed dataset for ``--data-path``: ``trainer/prepare_cli.py`` (``--help`` shows examples)."""

import os
import sys
import warnings

# megatron-core warns at import about fused kernels (Apex, TE) that a CPU machine never has.
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.prepare_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
