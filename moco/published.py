"""Published MoCo checkpoints by name, fetched once into a cache and checked.

For users with internet: ``--encoder moco_v2_800ep`` downloads the official facebookresearch/moco
ResNet-50 checkpoint, checks it against the md5 prefix the official README publishes, and
converts it to an encoder directory with ``export_encoder``. Nothing here runs unless a name is
asked for: the demo and the tests never download.
"""

from __future__ import annotations

import logging
import os
import urllib.request
from pathlib import Path

from moco.export import CONFIG, CheckpointError, export_encoder
from moco.files import atomic_file, file_hash

log = logging.getLogger(__name__)

_BASE = "https://dl.fbaipublicfiles.com/moco/moco_checkpoints"
PUBLISHED: dict[str, tuple[str, str]] = {
    "moco_v1_200ep": (f"{_BASE}/moco_v1_200ep/moco_v1_200ep_pretrain.pth.tar", "b251726a"),
    "moco_v2_200ep": (f"{_BASE}/moco_v2_200ep/moco_v2_200ep_pretrain.pth.tar", "59fd9945"),
    "moco_v2_800ep": (f"{_BASE}/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar", "a04e12f8"),
}
"""name -> (URL, md5 prefix from the official README's model table)."""


def cache_root() -> Path:
    return Path(os.environ.get("MOCO_SEARCH_CACHE", Path.home() / ".cache" / "moco-search"))


def fetch_published(name: str, cache: Path | None = None) -> Path:
    """The encoder directory of the published checkpoint ``name``, downloading it once."""
    if name not in PUBLISHED:
        raise ValueError(f"Unknown published encoder {name!r}; valid: {', '.join(PUBLISHED)}")
    url, md5_prefix = PUBLISHED[name]
    folder = (cache or cache_root()) / "published" / name
    encoder = folder / "encoder"
    if (encoder / CONFIG).is_file():
        return encoder
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / Path(url).name
    if not ckpt.is_file():
        log.info("downloading %s (once) to %s", url, ckpt)
        try:
            with atomic_file(ckpt) as tmp:
                urllib.request.urlretrieve(url, tmp)
        except OSError as e:
            raise CheckpointError(f"Could not download {name} from {url}: {e}") from e
    if not file_hash(ckpt, "md5").startswith(md5_prefix):
        ckpt.unlink()
        raise CheckpointError(f"{name}: the download does not match md5 {md5_prefix}; removed it")
    export_encoder(ckpt, encoder)
    return encoder


def resolve_encoder(value: str | os.PathLike) -> Path:
    """An encoder directory as given, or the cached encoder of a published checkpoint's name."""
    path = Path(value)
    if path.exists() or str(value) not in PUBLISHED:
        return path
    return fetch_published(str(value))
