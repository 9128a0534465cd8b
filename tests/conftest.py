"""Suite-wide setup: where there is no GPU, Triton runs interpreted. This must happen
before anything imports triton (the engine does, through its kernels), hence here."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
