"""The dashboard's pages: an HTML shell per page, rendered here, whose script reads the /v1 JSON routes.

The shell holds no data, so it is served without a key; the page's script sends the key the
person entered (kept in the browser session, never in a URL) with each /v1 request.
"""

from __future__ import annotations

import html
from functools import cache
from pathlib import Path
from string import Template

UI = Path(__file__).parent / "ui"
STATIC = UI / "static"
PAGES = {
    "runs": "Runs",
    "health": "Health",
    "layer": "Layer",
    "banks": "Memory banks",
    "bank": "Memory bank",
}
NAVIGATION = (("runs", "/", "Runs"), ("banks", "/ui/banks", "Memory banks"), ("health", "/ui/health", "Health"))
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".md": "text/markdown", "": "text/plain"}


@cache
def _template(name: str) -> Template:
    return Template((UI / "templates" / f"{name}.html").read_text())


def render(page: str, **data: int) -> str:
    """The page's HTML: the shell, the page's body, and the ids its script reads (as data attributes)."""
    attributes = " ".join(f'data-{name.replace("_", "-")}="{int(value)}"' for name, value in data.items())
    section = {"layer": "runs", "bank": "banks"}.get(page, page)
    navigation = "".join(
        f'<a href="{href}"{" aria-current=page" if name == section else ""}>{html.escape(label)}</a>'
        for name, href, label in NAVIGATION
    )
    return _template("shell").substitute(
        title=html.escape(PAGES[page]),
        page=page,
        script="bank" if page == "bank" else page,
        attributes=attributes,
        navigation=navigation,
        body=_template("bank" if page == "bank" else page).template,
    )


@cache
def static_files() -> dict[str, Path]:
    """Every file the dashboard serves, by its path under /ui/static/ (nothing else is reachable)."""
    return {path.relative_to(STATIC).as_posix(): path for path in STATIC.rglob("*") if path.is_file()}


def media_type(path: Path) -> str:
    return MEDIA_TYPES.get(path.suffix, "text/plain")
