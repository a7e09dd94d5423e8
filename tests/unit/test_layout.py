"""The layout's rules (docs/architecture.md), checked on the source: who imports whom; the public API."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import byoc

SRC = Path(byoc.__file__).parent


def _imports(path: Path) -> set[str]:
    """Every byoc module a file imports, at any depth (lazy imports inside functions included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "byoc" or name.startswith("byoc.")}


def _modules(package: str) -> list[Path]:
    return sorted((SRC / package.replace(".", "/")).rglob("*.py"))


RULES = [
    # (package whose files are checked, module prefixes they must never import)
    ("serve", ("byoc.dev", "byoc.testing", "byoc.scaffold")),
    ("session", ("byoc.dev", "byoc.serve")),
    ("trickle", ("byoc.dev", "byoc.serve", "byoc.session")),
    ("media", ("byoc.dev", "byoc.serve", "byoc.session", "byoc.processor")),
    ("builtin", ("byoc.dev", "byoc.serve", "byoc.session")),
]


@pytest.mark.parametrize(("package", "forbidden"), RULES, ids=[rule[0] for rule in RULES])
def test_imports_point_the_right_way(package: str, forbidden: tuple[str, ...]) -> None:
    files = _modules(package)
    assert files, f"no modules under byoc.{package}"
    wrong = [
        f"{path.relative_to(SRC)} imports {name}"
        for path in files
        for name in sorted(_imports(path))
        if name.startswith(forbidden)
    ]
    assert not wrong, "\n".join(wrong)


def test_isolation_imports_nothing_of_the_runtime_but_its_process_readings() -> None:
    """A worker process loads the processor contract and nothing of the runtime around it; the pool
    reads processes' memory as the runtime does (byoc.serve.system, a leaf)."""
    wrong = [
        f"{path.relative_to(SRC)} imports {name}"
        for path in _modules("isolation")
        for name in sorted(_imports(path))
        if name.startswith(("byoc.dev", "byoc.session", "byoc.serve")) and name != "byoc.serve.system"
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("leaf", ["logs.py", "threads.py", "errors.py", "serve/config.py", "serve/system.py"])
def test_leaves_import_no_session_and_no_runtime(leaf: str) -> None:
    allowed = (
        "byoc.errors",
        "byoc.params",
        "byoc.spec",
        "byoc.trickle.client",
        "byoc.trickle.protocol",
        "byoc.media.encoder",
    )
    imported = _imports(SRC / leaf)
    assert all(name.startswith(allowed) for name in imported), sorted(imported)


def test_the_api_does_not_import_the_runtime() -> None:
    assert "byoc.serve.runtime" not in _imports(SRC / "serve" / "api.py")


CORE = ["runtime.py", "manager.py", "health.py", "control.py", "metrics.py", "api.py"]


@pytest.mark.parametrize("core", CORE)
def test_the_runtime_core_knows_no_protocol(core: str) -> None:
    """The core chooses an adapter through byoc.serve.protocols and never imports one itself."""
    imported = _imports(SRC / "serve" / core)
    assert not [name for name in imported if name.startswith("byoc.serve.protocols.")], sorted(imported)


def test_the_public_api_is_declared() -> None:
    assert sorted(byoc.__all__) == ["Frame", "Processor", "SessionContext", "__version__", "load_processor"]
    for name in byoc.__all__:
        assert getattr(byoc, name) is not None
