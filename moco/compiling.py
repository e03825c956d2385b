"""``torch.compile`` on this project's terms: what every compile site here needs first."""

from __future__ import annotations

import logging

import torch


def quiet_cuda_extension_warning() -> None:
    """Silence torch's "No CUDA runtime is found" on machines without CUDA.

    Inductor imports ``torch.utils.cpp_extension``, which warns on every CPU machine, once per
    process, about building CUDA extensions: nothing here builds any, and the warning would
    start every compiled CPU run with a message that reads like a fault. Call it before the
    first compile; where CUDA works it does nothing.
    """
    if not torch.cuda.is_available():
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
