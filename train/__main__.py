"""`python -m train`: one rank of a training run (see train/rank.py)."""

from __future__ import annotations

import os
import sys

from train import EXIT_REQUEUE
from train.rank import main

__all__ = ["main"]  # slurm.rank calls train.__main__.main(argv) in-process

if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    # os._exit: DeepSpeed/gloo teardown can hang or print noise at interpreter exit; everything is written
    os._exit(code if code in (0, 1, 2, EXIT_REQUEUE) else 1)
