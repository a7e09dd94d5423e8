"""``byoc init NAME``: a new processor project, ready to test, run, check and build.

The files come from the templates in ``byoc/templates/processor/`` (package data): a package with one
processor (a tint with a ``strength`` parameter, following the processor contract of README.md,
"Writing a processor"), a test that runs it through a real session with :mod:`byoc.testing`, a
``pyproject.toml`` that depends on this version of byoc-runtime, a Dockerfile built on byoc's image and
a README with the commands that matter.
"""

from __future__ import annotations

import argparse
import keyword
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from byoc import __version__

__all__ = ["ProjectNames", "ScaffoldError", "create_project", "main", "project_names"]

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_RESERVED = frozenset({"byoc", "test", "tests", "src", "setup", "conftest"})

_FILES: tuple[tuple[str, str], ...] = (
    ("README.md.tmpl", "README.md"),
    ("pyproject.toml.tmpl", "pyproject.toml"),
    ("Dockerfile.tmpl", "Dockerfile"),
    ("dockerignore.tmpl", ".dockerignore"),
    ("gitignore.tmpl", ".gitignore"),
    ("package/__init__.py.tmpl", "{{package}}/__init__.py"),
    ("package/processor.py.tmpl", "{{package}}/processor.py"),
    ("tests/test_processor.py.tmpl", "tests/test_processor.py"),
)
"""Each template and where it goes in the project (paths may name placeholders)."""


class ScaffoldError(Exception):
    """The project cannot be created as asked (the message says why)."""


@dataclass(frozen=True, slots=True)
class ProjectNames:
    name: str
    """The distribution name, as given: ``demo-fx``."""
    package: str
    """The Python package: ``demo_fx``."""
    class_name: str
    """The processor class: ``DemoFx``."""

    def placeholders(self) -> dict[str, str]:
        return {
            "name": self.name,
            "package": self.package,
            "class_name": self.class_name,
            "byoc_version": __version__,
        }


def project_names(name: str) -> ProjectNames:
    """The names a project called ``name`` uses; ScaffoldError when ``name`` cannot be one."""
    if _NAME.fullmatch(name) is None:
        raise ScaffoldError(
            f"{name!r} is not a valid project name: use letters and digits, starting with a letter, "
            "with single '-', '_' or '.' between them (e.g. demo-fx)"
        )
    package = re.sub(r"[-.]", "_", name).lower()
    if keyword.iskeyword(package) or package in _RESERVED or package in sys.stdlib_module_names:
        raise ScaffoldError(
            f"{name!r} is not a valid project name: its package {package!r} would shadow "
            "a Python keyword, a standard-library module or byoc's own names"
        )
    class_name = "".join(part[:1].upper() + part[1:] for part in re.split(r"[-_.]", name))
    if class_name in {"Processor", "Frame", "SessionContext"}:
        class_name += "Processor"
    return ProjectNames(name, package, class_name)


def _render(text: str, values: Mapping[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"unknown placeholder {{{{{key}}}}}")
        return values[key]

    return _PLACEHOLDER.sub(value, text)


def create_project(name: str, parent: Path | str = ".") -> Path:
    """Create the project ``name`` as a new folder in ``parent``; returns the folder.

    Refuses (ScaffoldError) an invalid name, a ``parent`` that is not a folder, and a folder that
    exists already: nothing is ever overwritten.
    """
    names = project_names(name)
    parent = Path(parent)
    if not parent.is_dir():
        raise ScaffoldError(f"{parent} is not a folder")
    root = parent / name
    if root.exists() or root.is_symlink():
        raise ScaffoldError(f"{root} exists already; choose another name or remove it")
    values = names.placeholders()
    templates = resources.files("byoc").joinpath("templates", "processor")
    rendered = [
        (root / _render(target, values), _render(templates.joinpath(source).read_text("utf-8"), values))
        for source, target in _FILES
    ]
    root.mkdir()
    for path, text in rendered:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="byoc init",
        description="Create a processor project: a package with one processor, its test (byoc.testing), "
        "a pyproject.toml, a Dockerfile on byoc's image and a README.",
    )
    parser.add_argument("name", help="the project's name, e.g. demo-fx (package demo_fx)")
    parser.add_argument("--dir", default=".", help="the folder to create the project in (default: here)")
    args = parser.parse_args(argv)
    try:
        root = create_project(args.name, args.dir)
    except ScaffoldError as exc:
        print(f"byoc init: {exc}", file=sys.stderr)
        return 2
    names = project_names(args.name)
    print(f"created {root}: {names.package}.processor:{names.class_name}")
    print(f"next: cd {root} && pip install -e '.[test]' && pytest   (README.md has the rest)")
    return 0
