"""FAISS on the GPU when the GPU build is installed and a GPU is visible; the CPU otherwise.

Only IVF indexes go to the GPU: k-means training and adding are where its speed counts (10M
vectors into 16,384 lists is hours of CPU). Every function falls back to the CPU index when the
GPU cannot take it (a PQ with more sub-quantizers than the GPU kernels support, out of memory),
so callers never branch. The saved file is always a CPU index (``to_cpu``).
``MOCO_SEARCH_FAISS_GPU=0`` keeps FAISS on the CPU.
"""

from __future__ import annotations

import logging
import os
from functools import cache

import faiss

log = logging.getLogger(__name__)


def available() -> bool:
    """A FAISS GPU build with at least one visible GPU, not switched off by the environment."""
    if os.environ.get("MOCO_SEARCH_FAISS_GPU", "1") == "0":
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@cache
def _resources() -> object:
    return faiss.StandardGpuResources()


def to_gpu(index: faiss.Index) -> faiss.Index:
    """``index`` copied to GPU 0, or ``index`` itself when there is no GPU or it cannot go."""
    if not available():
        return index
    try:
        return faiss.index_cpu_to_gpu(_resources(), 0, index)
    except (RuntimeError, AttributeError) as e:
        log.info("FAISS index stays on the CPU (%s)", str(e).splitlines()[-1])
        return index


def to_cpu(index: faiss.Index) -> faiss.Index:
    """A CPU copy of a GPU index (what is saved); a CPU index is returned as it is."""
    if hasattr(faiss, "GpuIndex") and isinstance(index, faiss.GpuIndex):
        return faiss.index_gpu_to_cpu(index)
    return index
