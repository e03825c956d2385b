"""Choosing an index for a memory budget, as autofaiss does: the most accurate one that fits.

The candidates, most accurate first, with their size for ``n`` vectors of ``d`` dims:

=================  ============================  ===========================================
factory            bytes per vector              note
=================  ============================  ===========================================
``Flat``           4d + 8                        exact; only up to ``FLAT_MAX`` (then slow)
``IVF<L>,Flat``    4d + 8                        exact codes, probes a few of ``L`` lists
``IVF<L>,SQfp16``  2d + 8                        half; float16 codes, not re-ranked
``IVF<L>,SQ8``     d + 8                         4x smaller; re-ranked from SQLite
``IVF<L>,PQ<m>``   m + 8                         m in d/2, d/4 ... 8; re-ranked from SQLite
=================  ============================  ===========================================

plus ``L`` centroids (4d bytes each) and the codebooks. The 8 bytes are the id each inverted
list stores. Compressed codes only pick the candidates: the top ``rerank x k`` are scored again
with the exact vectors from SQLite, which is what keeps recall@10 near exact search (on
clustered embeddings SQ8 alone topped out near 0.94, PQ lower). Float16 codes need no second
pass: they are the vectors as ``--vector-dtype float16`` stores them, and within ~1e-4 of the
float32 ones, so they rank as exact codes do and skip a database read per query (at 1M vectors
that read was the largest part of a search).

The default budget, 2 GB, keeps exact codes up to about 950k vectors of 512 dims, float16 codes
up to 1.9M, SQ8 up to 3.8M and PQ128 at 10M (1.4 GB).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)

FLAT_MAX = 50_000
"""Above this many vectors brute force costs more than a millisecond per query."""
DEFAULT_BUDGET = 2_000_000_000
UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
UNITS |= {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
RERANK = {"Flat": 0, "SQfp16": 0, "SQ8": 4, "PQ": 10}
"""Candidates re-ranked per requested hit, by code type (0: the codes are exact already)."""


def parse_bytes(text: str | int) -> int:
    """``"2GB"`` -> 2e9, ``"1.5GiB"`` -> 1.5 * 2**30, ``"500M"``, ``123`` (bytes).

    Decimal units for ``KB/MB/GB/TB`` (as disks and ``df -H`` count), binary for ``KiB``...
    """
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?)?b?\s*", text.lower())
    if not m or float(m[1]) <= 0:
        raise ValueError(f"Not a memory size: {text!r}; use a number with a unit, e.g. 2GB, 500MB")
    return int(float(m[1]) * UNITS[m[2] or ""])


def format_bytes(n: int) -> str:
    """``2_252_274`` -> ``"2.3 MB"``: the decimal units ``parse_bytes`` reads, so a size that
    ``info`` prints can be given back as ``--max-index-memory``."""
    size, unit = float(n), "B"
    for bigger in ("KB", "MB", "GB", "TB"):
        if size < 1000:
            break
        size, unit = size / 1000, bigger
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"


def nlist_for(n: int) -> int:
    """IVF lists: about 4 sqrt(n), a power of two in [256, 65536], at least 39 vectors each."""
    nlist = 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))
    nlist = min(max(nlist, 256), 65536)
    while nlist > 1 and nlist * 39 > n:
        nlist //= 2
    return nlist


@dataclass(frozen=True)
class Choice:
    """An index type with its estimated size and re-ranking depth."""

    factory: str
    bytes: int
    rerank: int


def estimate(factory: str, n: int, d: int) -> int:
    """Approximate RAM (or mapped file) bytes of ``factory`` holding ``n`` vectors."""
    codes, extra = 4 * d, 0
    nlist = int(m[1]) if (m := re.search(r"IVF(\d+)", factory)) else 0
    if "SQfp16" in factory:
        codes = 2 * d
    elif "SQ8" in factory:
        codes, extra = d, 8 * d
    elif m := re.search(r"PQ(\d+)", factory):
        codes, extra = int(m[1]), 256 * 4 * d
    if "OPQ" in factory:
        extra += 4 * d * d
    return n * (codes + 8) + nlist * 4 * d + extra


def rerank_depth(factory: str) -> int:
    """How many candidates per hit to re-score exactly (0 for exact codes)."""
    tail = factory.rsplit(",", 1)[-1]
    if tail == "SQfp16":
        return RERANK["SQfp16"]
    if tail.startswith("SQ"):
        return RERANK["SQ8"]
    if "PQ" in tail or tail.startswith(("LSH", "RQ", "LSQ")):
        return RERANK["PQ"]
    return 0


def candidates(n: int, d: int) -> list[str]:
    """Factory strings for ``n`` vectors of ``d`` dims, most accurate first."""
    out = ["Flat"] if n <= FLAT_MAX else []
    nlist = nlist_for(n)
    out += [f"IVF{nlist},Flat", f"IVF{nlist},SQfp16", f"IVF{nlist},SQ8"]
    out += [
        f"IVF{nlist},PQ{m}"
        for m in (d // 2, d // 4, d // 8, d // 16, d // 32, d // 64)
        if m >= 8 and d % m == 0 and n >= 1000
    ]  # PQ trains 256 centroids per sub-vector
    return out


def choose(n: int, d: int, budget: int = DEFAULT_BUDGET) -> Choice:
    """The most accurate index whose estimated size fits ``budget`` bytes.

    When none fits, the smallest is taken with a warning: a collection is never refused for
    its size, the budget is a target.

    Examples:
        >>> choose(1_000_000, 512).factory
        'IVF4096,SQfp16'
        >>> choose(10_000_000, 512).factory
        'IVF16384,PQ128'
    """
    opts = candidates(n, d)
    for f in opts:
        if estimate(f, n, d) <= budget:
            return Choice(f, estimate(f, n, d), rerank_depth(f))
    f = min(opts, key=lambda f: estimate(f, n, d))
    log.warning(
        "No index of %d vectors fits %d bytes; the smallest, %s, needs %d",
        n,
        budget,
        f,
        estimate(f, n, d),
    )
    return Choice(f, estimate(f, n, d), rerank_depth(f))
