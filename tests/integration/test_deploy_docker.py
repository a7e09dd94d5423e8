"""The Docker build context, computed with Docker's .dockerignore rules, holds every COPY source and
nothing secret, and the Dockerfile runs ``byoc serve`` in exec form, as a non-root user, with STOPSIGNAL,
HEALTHCHECK and EXPOSE 8000.
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import re
import shlex
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.deploy_support import (
    DOCKERFILE,
    DOCKERIGNORE,
    ROOT,
    Instruction,
    dockerfile_env,
    parse_dockerfile,
)

# --- the Docker build context and the Dockerfile -------------------------------------------------


def _exec_form(args: str) -> list[str] | None:
    """The JSON-array (exec) form's arguments, or None for the shell form."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


@dataclass(frozen=True)
class IgnorePattern:
    text: str
    regex: re.Pattern[str]
    exception: bool


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern language: * and ? within a path part, ** across parts, [classes], \\ escapes."""
    out = ["^"]
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out.append("(?:.*/)?")
                i += 1
            else:
                out.append(".*")
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(char))
            else:
                body = pattern[i + 1 : end]
                if body.startswith(("^", "!")):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = end
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(char))
        i += 1
    out.append("$")
    return re.compile("".join(out))


def read_dockerignore(text: str) -> list[IgnorePattern]:
    patterns: list[IgnorePattern] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        if exception:
            line = line[1:].strip()
        line = posixpath.normpath(line)
        if len(line) > 1 and line.startswith("/"):
            line = line.lstrip("/")
        patterns.append(IgnorePattern(raw.strip(), _pattern_regex(line), exception))
    return patterns


def ignored(path: str, patterns: Iterable[IgnorePattern]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for pattern in patterns:
        if any(pattern.regex.match(candidate) for candidate in candidates):
            result = not pattern.exception
    return result


def build_context(root: Path, patterns: list[IgnorePattern]) -> set[str]:
    """The files `docker build root` sends, as paths relative to root."""
    has_exceptions = any(p.exception for p in patterns)
    files: set[str] = set()
    for directory, subdirs, filenames in os.walk(root):
        relative = Path(directory).relative_to(root).as_posix()
        prefix = "" if relative == "." else relative + "/"
        if not has_exceptions:  # nothing can come back from an ignored folder: do not descend
            subdirs[:] = [d for d in subdirs if not ignored(prefix + d, patterns)]
        files.update(prefix + name for name in filenames if not ignored(prefix + name, patterns))
    return files


@pytest.mark.parametrize(
    ("patterns", "path", "expected"),
    [
        (["**/__pycache__"], "src/byoc/__pycache__/x.pyc", True),
        (["**/__pycache__"], "__pycache__/x.pyc", True),
        (["out"], "out/a.ts", True),
        (["out"], "src/out/a.ts", False),  # unlike .gitignore, a plain name is anchored at the root
        (["*.env"], "example.env", True),
        (["*.env"], "deploy/example.env", False),
        (["**/*.env"], "deploy/example.env", True),
        (["/build"], "build/lib/x.py", True),
        (["deploy", "!deploy/keep.txt"], "deploy/keep.txt", False),
        (["deploy", "!deploy/keep.txt"], "deploy/other.txt", True),
        (["*", "!src"], "src/byoc/cli.py", False),
        (["*", "!src"], "README.md", True),
        (["docs/**/*.md"], "docs/a/b/c.md", True),
        (["docs/**/*.md"], "docs/c.md", True),
        (["docs/**/*.md"], "docs/c.txt", False),
        (["demo-output*"], "demo-output-1/frame.png", True),
        (["src/?.py"], "src/a.py", True),
        (["src/?.py"], "src/ab.py", False),
        (["src/[ab].py"], "src/b.py", True),
        (["src/[!ab].py"], "src/b.py", False),
        (["**"], "anything/at/all", True),
    ],
)
def test_dockerignore_semantics(patterns: list[str], path: str, expected: bool) -> None:
    assert ignored(path, read_dockerignore("\n".join(patterns))) is expected


@pytest.fixture(scope="module")
def context_files() -> set[str]:
    return build_context(ROOT, read_dockerignore(DOCKERIGNORE.read_text()))


def _copy_sources(instruction: Instruction) -> list[str]:
    words = _exec_form(instruction.args)
    if words is None:
        words = shlex.split(instruction.args)
        words = [w for w in words if not w.startswith("--")]
    return words[:-1]


def test_every_copy_source_is_in_the_build_context(context_files: set[str]) -> None:
    instructions = parse_dockerfile(DOCKERFILE.read_text())
    copies = [i for i in instructions if i.keyword in ("COPY", "ADD") and "--from=" not in i.args]
    assert copies
    sources: list[str] = []
    for instruction in copies:
        for source in _copy_sources(instruction):
            sources.append(source)
            normal = posixpath.normpath(source)
            if normal == ".":
                found = bool(context_files)
            elif any(char in normal for char in "*?["):
                found = any(fnmatch.fnmatchcase(path, normal) for path in context_files)
            else:
                found = normal in context_files or any(p.startswith(normal + "/") for p in context_files)
            assert found, f"line {instruction.line}: COPY source {source!r} is not in the build context"
    # what `pip install .` needs: the project file, its readme and the package sources
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["readme"]
    copied = {posixpath.normpath(source) for source in sources}
    assert {"pyproject.toml", readme, "src", "examples"} <= copied | {"."}, copied


def test_the_build_context_holds_the_sources_and_nothing_private(context_files: set[str]) -> None:
    needed = {
        "pyproject.toml",
        "README.md",
        "src/byoc/__init__.py",
        "src/byoc/cli.py",
        "examples/__init__.py",
        "examples/sepia_processor.py",
    }
    assert needed <= context_files, sorted(needed - context_files)
    unwanted = [
        path
        for path in context_files
        if path.split("/")[0] in {".git", ".venv", "tests", "deploy", ".mypy_cache", ".pytest_cache"}
        or "__pycache__" in path.split("/")
        or path.endswith(".env")
    ]
    assert not unwanted, sorted(unwanted)[:20]


def test_dockerfile_runs_byoc_serve_properly() -> None:
    instructions = parse_dockerfile(DOCKERFILE.read_text())

    def last(keyword: str) -> Instruction:
        found = [i for i in instructions if i.keyword == keyword]
        assert found, f"the Dockerfile has no {keyword}"
        return found[-1]

    base_args = [i.args for i in instructions if i.keyword == "ARG" and i.args.startswith("BASE_IMAGE=")]
    assert base_args == ["BASE_IMAGE=python:3.11-slim"]
    assert last("FROM").args.split()[0] in ("${BASE_IMAGE}", "$BASE_IMAGE")

    entrypoint = _exec_form(last("ENTRYPOINT").args)
    assert entrypoint is not None, "ENTRYPOINT must be in exec (JSON array) form"
    assert any(entrypoint[n : n + 2] == ["byoc", "serve"] for n in range(len(entrypoint)))
    for cmd in (i for i in instructions if i.keyword == "CMD"):
        assert _exec_form(cmd.args) is not None, f"line {cmd.line}: CMD must be in exec form"

    assert last("STOPSIGNAL").args in ("SIGTERM", "15")
    healthcheck = last("HEALTHCHECK").args
    assert healthcheck.upper() != "NONE"
    probe = _exec_form(healthcheck.partition("CMD")[2].strip())
    assert probe is not None, "HEALTHCHECK CMD must be in exec form"
    assert "/health" in " ".join(probe)
    assert "urllib" in " ".join(probe)

    user = last("USER").args.split(":")[0]
    assert user
    assert user not in ("root", "0")
    assert user.isdigit(), "a numeric USER lets Kubernetes check runAsNonRoot"
    exposed = {port for i in instructions if i.keyword == "EXPOSE" for port in i.args.split()}
    assert "8000" in exposed or "8000/tcp" in exposed

    env = dockerfile_env()
    assert env["BYOC_PORT"] == "8000"
    assert float(env["BYOC_DRAIN_TIMEOUT_S"]) < 10  # docker stop's default grace period
    runs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    assert "pip install --no-cache-dir" in runs
