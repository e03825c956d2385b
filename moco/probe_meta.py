"""A saved probe's description (``probe.json``), read without torch.

Listing a collection's probes (``moco-search info``, the web UI's classifier menu, the warning
that a re-embedded collection's probes need training again) reads only their classes, metrics
and encoder hash; this module imports nothing heavier than ``json``, so those answers do not wait
seconds for torch. ``moco.probe`` trains, saves and loads the weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PROBE_WEIGHTS, PROBE_CONFIG = "probe.safetensors", "probe.json"


def read_probe_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON side of a saved probe (classes, encoder hash, metrics), without its weights."""
    path = Path(path)
    if not (path / PROBE_CONFIG).is_file():
        raise FileNotFoundError(f"No probe at {path} (missing {PROBE_CONFIG})")
    try:
        meta = json.loads((path / PROBE_CONFIG).read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("classes"), list):
            raise ValueError("not a probe's description")
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(
            f"{path / PROBE_CONFIG} is damaged ({e}): train the probe {path.name!r} again"
        ) from None
    return meta
