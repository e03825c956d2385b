"""Events replayed as an attacker would: plain HTTP to Gradio's queue API, any data at all.

The browser calls ``POST /gradio_api/queue/join`` with the event's inputs and reads the results
from ``GET /gradio_api/queue/data`` (server-sent events). Nothing stops a client from sending
other inputs than the page would, for events that the page hides or marks private too.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Reply:
    """Everything the server sent back for one event, raw and decoded."""

    raw: bytes
    messages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def completed(self) -> dict[str, Any]:
        return next(m for m in self.messages if m.get("msg") == "process_completed")

    @property
    def success(self) -> bool:
        return bool(self.completed.get("success"))

    @property
    def error(self) -> str:
        return str(self.completed.get("output", {}).get("error") or "")

    @property
    def warnings(self) -> list[str]:
        """The warnings shown on the page (a page event's refusal, ``app.events.guarded``)."""
        return [
            m["log"] for m in self.messages if m.get("msg") == "log" and m["level"] == "warning"
        ]

    @property
    def skipped(self) -> bool:
        """Whether the event left every output as it was (``gr.skip()``): each is a bare
        update, or None where a ``gr.State`` sits (states stay on the server)."""
        data = self.completed.get("output", {}).get("data") or []
        bare = [d == {"__type__": "update"} for d in data]
        return any(bare) and all(b or d is None for b, d in zip(bare, data, strict=True))

    def urls(self) -> list[str]:
        """Every file URL in the reply (what the page would fetch next)."""
        found: list[str] = []

        def walk(v: Any) -> None:
            if isinstance(v, dict):
                if isinstance(v.get("url"), str):
                    found.append(v["url"])
                for x in v.values():
                    walk(x)
            elif isinstance(v, list):
                for x in v:
                    walk(x)

        walk(self.messages)
        return found


def fn_index(demo: Any, name: str) -> int:
    """The queue index of the event whose handler is called ``name``."""
    for i, block_fn in demo.fns.items():
        if getattr(block_fn.fn, "__name__", None) == name:
            return int(i)
    raise KeyError(name)


def call(
    demo: Any,
    name: str,
    data: list[Any],
    event_data: Any = None,
    session: str | None = None,
    timeout: float = 60,
) -> Reply:
    """Run event ``name`` with ``data`` (one entry per input, None for a ``gr.State``)."""
    base = demo.local_url.rstrip("/") + "/gradio_api"
    session = session or uuid.uuid4().hex
    body = {
        "data": data,
        "event_data": event_data,
        "fn_index": fn_index(demo, name),
        "session_hash": session,
    }
    req = urllib.request.Request(
        f"{base}/queue/join", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        r.read()
    url = f"{base}/queue/data?{urllib.parse.urlencode({'session_hash': session})}"
    reply = Reply(b"")
    with urllib.request.urlopen(url, timeout=timeout) as r:
        for line in r:
            reply.raw += line
            if line.startswith(b"data:"):
                msg = json.loads(line[5:])
                reply.messages.append(msg)
                if msg.get("msg") == "process_completed":
                    break
    return reply


def get(demo: Any, url_or_path: str) -> tuple[int, bytes]:
    """GET a URL of the server (or ``/gradio_api/file=<path>`` for a path): status and body."""
    if "://" not in url_or_path:
        quoted = urllib.parse.quote(url_or_path)
        url_or_path = f"{demo.local_url.rstrip('/')}/gradio_api/file={quoted}"
    try:
        with urllib.request.urlopen(url_or_path, timeout=30) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


def upload(demo: Any, path: str) -> dict[str, Any]:
    """Upload a file as the page does (``POST /gradio_api/upload``); its FileData payload."""
    boundary = uuid.uuid4().hex
    with open(path, "rb") as f:
        content = f.read()
    name = path.rsplit("/", 1)[-1]
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
        f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
    ).encode()
    body += content + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(
        f"{demo.local_url.rstrip('/')}/gradio_api/upload",
        body,
        {"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        (server_path,) = json.loads(r.read())
    return {"path": server_path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}
