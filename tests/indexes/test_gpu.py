"""FAISS on the GPU (runs only where the FAISS GPU build sees a GPU): same results as the CPU."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from indexes import gpu, vectors
from tests.indexes.test_vectors import chunks, clustered

pytestmark = pytest.mark.skipif(not gpu.available(), reason="needs the FAISS GPU build and a GPU")


@pytest.mark.parametrize("factory", ["IVF64,Flat", "IVF64,SQ8"])
def test_gpu_search_agrees_with_cpu(factory: str) -> None:
    x = clustered(20_000, dim=64, centers=100)
    ids = np.arange(1, 20_001, dtype=np.int64)
    cpu = vectors.build(factory, 64, ids, lambda i: x[i - 1], chunks(ids, x))  # trained on GPU
    assert not isinstance(cpu, faiss.GpuIndex)  # what is saved is a CPU index
    on_gpu = gpu.to_gpu(cpu)
    assert isinstance(on_gpu, faiss.GpuIndex)
    q = clustered(50, dim=64, centers=100, seed=4)
    params = {"nprobe": 8}
    want = vectors.knn(cpu, q, 10, params)
    got = vectors.knn(on_gpu, q, 10, params)
    pairs = zip(want, got, strict=True)
    overlap = np.mean([len({i for i, _ in a} & {i for i, _ in b}) / 10 for a, b in pairs])
    assert overlap >= 0.99
    np.testing.assert_allclose(
        [s for row in got for _, s in row], [s for row in want for _, s in row], atol=1e-3
    )
