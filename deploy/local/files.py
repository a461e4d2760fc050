"""Generated config files."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from string import Template

_PACKAGE = "dicomgrid.deploy.local"


def render_template(name: str, dest: Path, **values: object) -> Path:
    """Write ``templates/<name>`` to ``dest`` with ``$key`` placeholders filled in.

    Files are regenerated on every start so that a changed grid config (ports, heap, paths) always
    reaches the JVM; hand edits belong in the template.
    """
    text = resources.files(_PACKAGE).joinpath("templates", name).read_text(encoding="utf-8")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(Template(text).substitute(values), encoding="utf-8")
    return dest
