"""Where a collection's probes live, and which it has, read without torch.

``info``, the web UI's classifier menu and the warning after ``index --reembed`` only list probes
(their names, classes, metrics and encoder hash), so this module reads the ``probe.json`` files
alone; ``indexes.classify`` trains and applies the probes and needs torch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moco import file_identity, read_probe_meta

if TYPE_CHECKING:
    from indexes.collection import Collection

log = logging.getLogger(__name__)

PROBES_DIR = "probes"
DEFAULT_PROBE = "default"


def probe_dir(collection: Collection | str | os.PathLike, name: str = DEFAULT_PROBE) -> Path:
    """Where the probe ``name`` of a collection lives; names are plain folder names."""
    if not name or name != Path(name).name or name.startswith("."):
        raise ValueError(f"Bad probe name {name!r}: use a plain name such as 'default'")
    root = Path(collection) if isinstance(collection, (str, os.PathLike)) else collection.path
    return root / PROBES_DIR / name


def stale_probes(collection: str | os.PathLike, content_hash: str) -> list[str]:
    """Names of the collection's probes trained on another encoder's features than
    ``content_hash`` (after ``index --reembed``: refused until trained again)."""
    return [n for n, m in list_probes(collection).items() if m["encoder_hash"] != content_hash]


def probe_version(collection: Collection, name: str = DEFAULT_PROBE) -> object:
    """What a cache of probe ``name`` is keyed on: its metadata file, which ``save_probe``
    writes last, after the weights (None while there is no such probe)."""
    return file_identity(probe_dir(collection, name) / "probe.json")


def list_probes(collection: Collection | str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The saved probes of a collection with their metadata (classes, metrics, encoder hash)."""
    root = probe_dir(collection).parent
    if not root.is_dir():
        return {}
    found = {}
    for d in sorted(root.iterdir()):
        if (d / "probe.json").is_file():
            try:
                found[d.name] = read_probe_meta(d)
            except ValueError as e:  # one damaged probe must not take the others (or the UI)
                seen = (str(d), file_identity(d / "probe.json"))
                if seen not in _DAMAGED_SAID:  # once, not at every page load
                    _DAMAGED_SAID.add(seen)
                    log.warning("%s; left out", e)
    return found


_DAMAGED_SAID: set[tuple[str, Any]] = set()
