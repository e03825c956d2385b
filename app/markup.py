"""Text that files and users wrote, shown in the page as itself.

File names, folder names and labels reach the page inside Gradio's Markdown, which renders
Markdown and HTML, and in its warnings, which render HTML. A label typed by one user
(``<img src=http://tracker/>``, ``[link](...)``) or a file named so in an indexed folder would
otherwise become markup in every other user's page: a request to any address, a changed page.
Gradio's sanitiser strips scripts, not images, links or formatting.
"""

from __future__ import annotations

import html
import re

_SPECIAL = re.compile(r"([\\`*_\[\]<>&~$|:.])")
"""What Markdown reads inside a line (emphasis, code, links and images, HTML, entities,
strike-through, Gradio's ``$$`` LaTeX, table cells, and the ``http:``, ``www.`` and e-mail
addresses GitHub's dialect turns into links, eating a backslash after them); CommonMark lets a
backslash escape any ASCII punctuation. Marks that count only at a line's start (``#``, ``-``)
stay: the text is never put there."""


def md(text: object) -> str:
    """``text`` as literal Markdown: one line, each special character escaped."""
    return _SPECIAL.sub(r"\\\1", " ".join(str(text).splitlines()))


def code(text: object) -> str:
    """``text`` as literal Markdown in a monospace font (a backtick span cannot hold a
    backtick, and an escape inside one shows as a backslash)."""
    return f"<code>{md(text)}</code>"


def plain_html(text: object) -> str:
    """``text`` for a Gradio warning, which renders HTML."""
    return html.escape(str(text), quote=False)
