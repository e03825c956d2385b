#!/usr/bin/env python3
"""Build the demo image collection that ships in ``app/demo/images/`` (and ``app/demo/NOTICE``).

Where the images come from
    Microsoft Fluent Emoji, 3D style (MIT licence), as repackaged on npm by LobeHub:
    ``@lobehub/fluent-emoji-3d@1.1.0`` (256x256 RGBA WebP files named by codepoint).
    Names and Unicode categories come from ``emoji-datasource@16.0.0`` (MIT, metadata only;
    none of its images are used). Both packages are fetched with ``npm pack``; nothing is
    installed and nothing but the npm registry is contacted.

What it builds
    * one image per emoji, without skin-tone variants (the yellow default only);
    * left out: renderings that Microsoft did not release under MIT (see ``EXCLUDED_*``), and
      any category with fewer than ``MIN_PER_CLASS`` images (here ``flags``: 8 non-national
      flags are left once country flags are out; ``component`` has no images at all);
    * each image downscaled to fit in SIZE x SIZE (aspect kept, alpha kept) and stored as lossy
      WebP. The first (size, quality) step of ``LADDER`` whose tree fits in ``MAX_BYTES`` (counted
      in 4 KiB disk blocks, as ``du`` does) is used: 128 px / quality 80 unless that is too big;
    * an ImageFolder tree ``images/<label>/<name>.webp`` and ``images/manifest.csv`` with the
      columns ``path,label,name,codepoints,split``. ``split`` is a fixed train/val split
      (``VAL_FRAC`` of each label in val), drawn by SHA-256 of the emoji's group, so it is the same
      on every machine. Gender variants of one emoji (``man running``, ``woman running``,
      ``person running``) form one group and land in the same split;
    * ``app/demo/NOTICE`` with the attribution and the licence texts.

Re-run (from the repository root; 15-30 s on 2 CPU cores, 41 MB download)::

    .venv/bin/python bench/build_demo_images.py

Options: ``--cache DIR`` keeps the downloaded .tgz files, ``--include-trademarked`` keeps the
renderings left out by default. Needs Python >= 3.10, Pillow with WebP support and ``npm``.
Output is replaced atomically; a second run gives byte-identical files (same Pillow/libwebp).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

FLUENT_PKG = "@lobehub/fluent-emoji-3d"
FLUENT_VERSION = "1.1.0"
DATASOURCE_PKG = "emoji-datasource"
DATASOURCE_VERSION = "16.0.0"

HERE = Path(__file__).resolve().parents[1] / "app" / "demo"  # a maintainer's tool, not installed
DEFAULT_OUT = HERE / "images"
NOTICE_PATH = HERE / "NOTICE"
MANIFEST = "manifest.csv"
FIELDS = ("path", "label", "name", "codepoints", "split")

MAX_BYTES = 10_000_000  # whole tree incl. manifest, each file rounded up to BLOCK bytes
BLOCK = 4096
LADDER: tuple[tuple[int, int], ...] = ((128, 80), (112, 80), (96, 80), (96, 70), (96, 60))
WEBP_METHOD = 4  # 6 is ~50x slower here for ~3% smaller files
SEED = 0
VAL_FRAC = 0.2
MIN_PER_CLASS = 10

SKIN_TONES = frozenset({"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"})
# Microsoft's fluentui-emoji README: "Not all emojis can be open-sourced (because of trademarks).
# This list includes: the Clippy-like paperclip, national flags, technologist and video games
# emojis." Its MIT repository has neutral versions of these; the npm package ships the
# trademarked ones instead (Clippy, an Xbox-style pad, a laptop with the Windows logo) plus flat
# national flags that are not in Microsoft's release at all. Left out unless --include-trademarked.
EXCLUDED_SUBCATEGORIES = frozenset({"country-flag"})
EXCLUDED_CODEPOINTS = {
    "1f4ce": "paperclip drawn as Clippy",
    "1f3ae": "video game drawn as an Xbox-style controller",
    "1f9d1-200d-1f4bb": "technologist: laptop with the Windows logo",
    "1f468-200d-1f4bb": "man technologist: laptop with the Windows logo",
    "1f469-200d-1f4bb": "woman technologist: laptop with the Windows logo",
}
# For the split: people who differ only by gender or age wording are one group.
PERSON_ALIASES = {
    "1f468": "1f9d1",  # man -> person
    "1f469": "1f9d1",  # woman -> person
    "1f466": "1f9d2",  # boy -> child
    "1f467": "1f9d2",  # girl -> child
    "1f474": "1f9d3",  # old man -> older person
    "1f475": "1f9d3",  # old woman -> older person
}
GENDER_SIGNS = frozenset({"2640", "2642"})

FLUENT_MIT = """\
MIT License

Copyright (c) Microsoft Corporation.

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def log(msg: str) -> None:
    print(f"[build_demo_images {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Emoji:
    unified: str  # e.g. "1F468-200D-1F4BB", as spelled by emoji-datasource
    name: str  # Unicode / CLDR name, e.g. "MAN TECHNOLOGIST"
    short_names: tuple[str, ...]
    category: str  # e.g. "Smileys & Emotion"
    subcategory: str  # e.g. "face-smiling"

    @property
    def key(self) -> str:
        return norm(self.unified)

    @property
    def label(self) -> str:
        return slug(self.category)


@dataclass(frozen=True)
class Item:
    emoji: Emoji
    member: str  # file inside the fluent tarball
    data: bytes


# ----------------------------------------------------------------------------- helpers
def norm(code: str) -> str:
    """Canonical codepoint key: lowercase hex, no leading zeros, no FE0F (``0023-FE0F`` -> 23)."""
    parts = code.lower().replace("_", "-").split("-")
    return "-".join(f"{int(p, 16):x}" for p in parts if p and p != "fe0f")


def slug(text: str) -> str:
    """ASCII, lowercase, ``[a-z0-9_]`` only: ``"Côte d’Ivoire"`` -> ``"cote_d_ivoire"``."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    out = "".join(c if c.isalnum() else "_" for c in ascii_text.lower())
    return "_".join(p for p in out.split("_") if p)


def unit_hash(key: str, seed: int = SEED) -> float:
    """Deterministic number in [0, 1) for KEY (same on every machine and Python version)."""
    digest = hashlib.sha256(f"{seed}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def group_key(unified: str) -> str:
    """Emoji that differ only by gender/age wording share a key (for a leak-free split)."""
    parts = [PERSON_ALIASES.get(p, p) for p in norm(unified).split("-") if p not in GENDER_SIGNS]
    while parts and parts[-1] == "200d":
        parts.pop()
    return "-".join(parts) or norm(unified)


def disk_size(n_bytes: int) -> int:
    return -(-n_bytes // BLOCK) * BLOCK


def npm_pack(spec: str, dest: Path) -> Path:
    """``npm pack SPEC`` into DEST unless already there; returns the .tgz path."""
    name, _, version = spec.rpartition("@")
    path = dest / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
    if path.is_file() and path.stat().st_size > 0:
        log(f"cached {path}")
        return path
    log(f"$ npm pack {spec}")
    out = subprocess.run(
        ["npm", "pack", spec, "--pack-destination", str(dest), "--silent"],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout.split()
    got = dest / out[-1] if out else path
    if got != path:
        got.replace(path)
    return path


def read_member(tgz: Path, member: str) -> bytes:
    with tarfile.open(tgz, "r:gz") as tar:
        f = tar.extractfile(member)
        if f is None:
            raise SystemExit(f"{tgz.name}: {member} is missing")
        return f.read()


# ----------------------------------------------------------------------------- selection
def load_emoji(datasource_tgz: Path) -> dict[str, Emoji]:
    """Base emoji (no skin-tone variations) from emoji-datasource, keyed by ``norm(unified)``."""
    meta = json.loads(read_member(datasource_tgz, "package/emoji.json"))
    out: dict[str, Emoji] = {}
    for e in meta:
        emoji = Emoji(
            unified=e["unified"],
            name=e["name"] or e["short_name"],
            short_names=tuple(e["short_names"]),
            category=e["category"],
            subcategory=e["subcategory"],
        )
        out[emoji.key] = emoji
    return out


def is_excluded(emoji: Emoji) -> bool:
    return emoji.subcategory in EXCLUDED_SUBCATEGORIES or emoji.key in EXCLUDED_CODEPOINTS


def select_fluent(
    fluent_tgz: Path, emoji: dict[str, Emoji], include_trademarked: bool
) -> tuple[list[Item], Counter[str]]:
    """One fluent3d image per base emoji; returns the items and counts of what was skipped."""
    skipped: Counter[str] = Counter()
    chosen: dict[str, tuple[str, bool]] = {}  # emoji key -> (member, exact spelling)
    with tarfile.open(fluent_tgz, "r:gz") as tar:
        members = sorted(
            m.name for m in tar.getmembers() if m.isfile() and m.name.startswith("package/assets/")
        )
        for member in members:
            stem = member.rsplit("/", 1)[1].rsplit(".", 1)[0]
            key = norm(stem)
            if SKIN_TONES & set(key.split("-")):
                skipped["skin-tone variant"] += 1
                continue
            e = emoji.get(key)
            if e is None:
                skipped["not in emoji-datasource"] += 1
                continue
            if not include_trademarked and is_excluded(e):
                skipped["trademarked / not in Microsoft's MIT release"] += 1
                continue
            # A few emoji ship twice (with/without leading zeros or FE0F): prefer the spelling
            # that matches emoji-datasource, else the first in sorted order.
            exact = stem.lower() == e.unified.lower()
            if key in chosen:
                skipped["duplicate spelling"] += 1
                if chosen[key][1] or not exact:
                    continue
            chosen[key] = (member, exact)
        wanted = {member: key for key, (member, _) in chosen.items()}
        items = []
        for m in tar:
            if m.name in wanted:
                f = tar.extractfile(m)
                assert f is not None
                items.append(Item(emoji[wanted[m.name]], m.name, f.read()))
    return items, skipped


def drop_small_classes(items: list[Item]) -> tuple[list[Item], dict[str, int]]:
    counts = Counter(it.emoji.label for it in items)
    small = {label: n for label, n in counts.items() if n < MIN_PER_CLASS}
    return [it for it in items if it.emoji.label not in small], small


def file_stems(items: Iterable[Item]) -> dict[str, str]:
    """Unique ASCII file stem per emoji key, from its short name (``thumbsup``, ``grinning``)."""
    stems: dict[str, str] = {}
    used: set[str] = set()
    for it in sorted(items, key=lambda it: it.emoji.key):
        e = it.emoji
        candidates = [slug(s) for s in e.short_names] + [slug(e.name)]
        stem = next((c for c in candidates if any(ch.isalpha() for ch in c)), "emoji")
        if stem in used:
            stem = f"{stem}_{e.key.replace('-', '_')}"
        used.add(stem)
        stems[e.key] = stem
    return stems


def assign_splits(
    items: list[Item], seed: int = SEED, val_frac: float = VAL_FRAC
) -> dict[str, str]:
    """Emoji key -> "train" / "val". Per label, whole groups in hash order go to val until
    ``val_frac`` of the label is reached (so every label gets its share, to within one group)."""
    groups: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        groups[group_key(it.emoji.unified)].append(it)
    by_label: dict[str, list[str]] = defaultdict(list)
    for g, members in groups.items():
        label = Counter(it.emoji.label for it in members).most_common(1)[0][0]
        by_label[label].append(g)
    label_sizes = Counter(it.emoji.label for it in items)
    split: dict[str, str] = {}
    for label, keys in by_label.items():
        target = round(val_frac * label_sizes[label])
        n_val = 0
        for g in sorted(keys, key=lambda g: (unit_hash(g, seed), g)):
            part = "val" if n_val < target else "train"
            n_val += len(groups[g]) if part == "val" else 0
            for it in groups[g]:
                split[it.emoji.key] = part
    return split


# ----------------------------------------------------------------------------- encoding
def encode(data: bytes, size: int, quality: int) -> bytes:
    with Image.open(io.BytesIO(data)) as src:
        im = src.convert("RGBA")
    im.thumbnail((size, size), Image.Resampling.LANCZOS)  # keeps aspect; premultiplied alpha
    buf = io.BytesIO()
    im.save(buf, "WEBP", quality=quality, method=WEBP_METHOD)
    return buf.getvalue()


def manifest_text(rows: list[dict[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: r["path"]))
    return buf.getvalue()


def render(
    items: list[Item], stems: dict[str, str], split: dict[str, str]
) -> tuple[int, int, dict[str, bytes], str]:
    """Encode at the first LADDER step that fits MAX_BYTES; returns size, quality, files, csv."""
    for size, quality in LADDER:
        t0 = time.time()
        files: dict[str, bytes] = {}
        rows: list[dict[str, str]] = []
        for it in items:
            e = it.emoji
            path = f"{e.label}/{stems[e.key]}.webp"
            files[path] = encode(it.data, size, quality)
            name = e.name.replace("\u2019", "'").lower()
            rows.append(
                dict(path=path, label=e.label, name=name, codepoints=e.unified, split=split[e.key])
            )
        text = manifest_text(rows)
        total = sum(disk_size(len(b)) for b in files.values()) + disk_size(len(text.encode()))
        log(
            f"{size}px q{quality}: {len(files)} files, {total / 1e6:.2f} MB on disk "
            f"({sum(map(len, files.values())) / 1e6:.2f} MB of data), {time.time() - t0:.1f}s"
        )
        if total <= MAX_BYTES:
            return size, quality, files, text
    raise SystemExit(f"even {LADDER[-1]} does not fit in {MAX_BYTES} bytes")


def write_tree(out: Path, files: dict[str, bytes], manifest: str, force: bool) -> None:
    """Write into OUT.partial-PID, check every file opens, then swap it in for OUT."""
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists() and not force:
        raise SystemExit(f"{out} is not empty and has no {MANIFEST}; use --force")
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        (tmp / MANIFEST).write_text(manifest, encoding="utf-8")
        verify(tmp)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def verify(root: Path) -> None:
    """Every manifest row opens in Pillow as WebP; no file is missing or left over."""
    with open(root / MANIFEST, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    listed = {r["path"] for r in rows}
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*.webp")}
    if listed != on_disk or len(listed) != len(rows):
        raise SystemExit(f"manifest and files differ: {sorted(listed ^ on_disk)[:5]}")
    for r in rows:
        with Image.open(root / r["path"]) as im:
            im.load()
            if im.format != "WEBP" or max(im.size) > LADDER[0][0]:
                raise SystemExit(f"{r['path']}: {im.format} {im.size}")


# ----------------------------------------------------------------------------- NOTICE
def notice_text(
    size: int,
    quality: int,
    n_images: int,
    include_trademarked: bool,
    dropped_classes: dict[str, int],
    datasource_license: str,
    fluent_readme_copyright: str,
) -> str:
    def bullet(text: str) -> str:
        return textwrap.fill(
            text, 96, initial_indent="  * ", subsequent_indent="    ", break_on_hyphens=False
        )

    changes = [
        f"downscaled from 256x256 to fit in {size}x{size} pixels (aspect ratio and alpha kept) "
        f"and re-encoded as lossy WebP, quality {quality};",
        "renamed to <category>/<short name>.webp; skin-tone variants not included;",
    ]
    if not include_trademarked:
        changes.append(
            "left out because Microsoft's README says they could not be open-sourced "
            "(trademarks) and the npm package's renderings differ from Microsoft's MIT "
            "repository (Windows-style originals; the flags are not in it at all): national flags "
            "(CLDR subcategory country-flag), " + ", ".join(EXCLUDED_CODEPOINTS.values()) + ";"
        )
    if dropped_classes:
        small = ", ".join(f"{k} ({n} images)" for k, n in sorted(dropped_classes.items()))
        changes.append(f"left out categories with fewer than {MIN_PER_CLASS} images: {small}.")
    return f"""\
Demo images: Microsoft Fluent Emoji (3D style)
==============================================

The {n_images} images under app/demo/images/ are Microsoft Fluent Emoji in the 3D style,
https://github.com/microsoft/fluentui-emoji, Copyright (c) Microsoft Corporation,
licensed under the MIT License (full text below).

They were taken from the npm package {FLUENT_PKG}@{FLUENT_VERSION}
(https://github.com/lobehub/fluent-emoji, repackaged by LobeHub; package.json "license": "MIT";
its README: "{fluent_readme_copyright} This project is MIT licensed.").

Changes made by moco-search (bench/build_demo_images.py, which rebuilds everything here):
{chr(10).join(bullet(c) for c in changes)}

Emoji names and categories (app/demo/images/manifest.csv) come from the npm package
{DATASOURCE_PKG}@{DATASOURCE_VERSION} (https://github.com/iamcal/emoji-data), MIT License,
Copyright (c) 2013 Cal Henderson (full text below). No images from that package are used.

The {FLUENT_PKG} tarball holds no LICENSE file (only package.json and README.md).
The text below is the MIT License with the copyright line of Microsoft's fluentui-emoji
repository, which the package's images come from.

-------------------------------------------------------------------------------
Microsoft Fluent Emoji -- MIT License
-------------------------------------------------------------------------------

{FLUENT_MIT}
-------------------------------------------------------------------------------
{DATASOURCE_PKG} {DATASOURCE_VERSION} -- LICENSE (copied from the npm package)
-------------------------------------------------------------------------------

{datasource_license.strip()}
"""


def fluent_copyright(fluent_tgz: Path) -> str:
    """Check the package says MIT; return the copyright line of its README."""
    package = json.loads(read_member(fluent_tgz, "package/package.json"))
    if package.get("license") != "MIT" or package.get("version") != FLUENT_VERSION:
        raise SystemExit(f"{FLUENT_PKG}: unexpected package.json {package.get('license')!r}")
    readme = read_member(fluent_tgz, "package/README.md").decode("utf-8")
    line = next((ln for ln in readme.splitlines() if ln.startswith("Copyright")), "")
    # "Copyright © 2023 [LobeHub][profile-url]. <br />" -> "Copyright © 2023 LobeHub."
    return line.replace("[LobeHub][profile-url]", "LobeHub").replace("<br />", "").strip()


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="default: %(default)s")
    ap.add_argument("--notice", type=Path, default=NOTICE_PATH, help="default: %(default)s")
    ap.add_argument("--cache", type=Path, help="keep the downloaded .tgz files here")
    ap.add_argument(
        "--include-trademarked",
        action="store_true",
        help="keep national flags, Clippy, Xbox pad, Windows-logo laptops",
    )
    ap.add_argument("--force", action="store_true", help="overwrite a foreign non-empty --out")
    args = ap.parse_args(argv)
    t0 = time.time()

    tmp_cache = None
    if args.cache:
        cache = args.cache.resolve()
        cache.mkdir(parents=True, exist_ok=True)
    else:
        tmp_cache = cache = Path(tempfile.mkdtemp(prefix="moco-demo-npm-"))
    try:
        fluent_tgz = npm_pack(f"{FLUENT_PKG}@{FLUENT_VERSION}", cache)
        datasource_tgz = npm_pack(f"{DATASOURCE_PKG}@{DATASOURCE_VERSION}", cache)
        emoji = load_emoji(datasource_tgz)
        items, skipped = select_fluent(fluent_tgz, emoji, args.include_trademarked)
        datasource_license = read_member(datasource_tgz, "package/LICENSE").decode("utf-8")
        copyright_line = fluent_copyright(fluent_tgz)
    finally:
        if tmp_cache is not None:
            shutil.rmtree(tmp_cache, ignore_errors=True)
    for reason, n in sorted(skipped.items()):
        log(f"skipped {n:4d} fluent files: {reason}")

    items, small = drop_small_classes(items)
    if small:
        log(f"dropped classes with < {MIN_PER_CLASS} images: {small}")
    items.sort(key=lambda it: it.emoji.key)
    stems = file_stems(items)
    split = assign_splits(items)
    size, quality, files, manifest = render(items, stems, split)
    write_tree(args.out.resolve(), files, manifest, args.force)
    args.notice.write_text(
        notice_text(
            size,
            quality,
            len(files),
            args.include_trademarked,
            small,
            datasource_license,
            copyright_line,
        ),
        encoding="utf-8",
    )

    per_class: dict[str, dict[str, int]] = defaultdict(lambda: {"train": 0, "val": 0})
    for it in items:
        per_class[it.emoji.label][split[it.emoji.key]] += 1
    summary = {
        "out": str(args.out),
        "images": len(files),
        "size_px": size,
        "webp_quality": quality,
        "bytes": sum(map(len, files.values())),
        "bytes_on_disk": sum(disk_size(len(b)) for b in files.values()),
        "splits": dict(Counter(split.values())),
        "per_class": {k: per_class[k] for k in sorted(per_class)},
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
