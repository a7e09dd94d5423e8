"""``byoc init``: the project it creates parses, its test passes, and it refuses what it cannot create."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from byoc import __version__
from byoc.scaffold import ScaffoldError, create_project, project_names

EXPECTED_FILES = {
    ".dockerignore",
    ".gitignore",
    "Dockerfile",
    "README.md",
    "pyproject.toml",
    "demo_fx/__init__.py",
    "demo_fx/processor.py",
    "tests/test_processor.py",
}


def _byoc(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "byoc", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def _files(root: Path) -> set[str]:
    return {path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    parent = tmp_path_factory.mktemp("init")
    result = _byoc("init", "demo-fx", cwd=parent)
    assert result.returncode == 0, result.stderr
    assert "demo_fx.processor:DemoFx" in result.stdout
    return parent / "demo-fx"


def test_the_project_has_its_files_and_every_placeholder_filled(project: Path) -> None:
    assert _files(project) == EXPECTED_FILES
    for name in EXPECTED_FILES:
        text = (project / name).read_text()
        assert re.search(r"\{\{\w*\}\}", text) is None, name


def test_the_pyproject_depends_on_this_byoc_runtime(project: Path) -> None:
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    assert pyproject["project"]["name"] == "demo-fx"
    assert pyproject["project"]["dependencies"] == [f"byoc-runtime>={__version__}"]
    assert any(r.startswith("pytest") for r in pyproject["project"]["optional-dependencies"]["test"])
    assert pyproject["tool"]["setuptools"]["packages"]["find"]["include"][0] == "demo_fx"


def test_the_python_files_compile(project: Path) -> None:
    for name in sorted(EXPECTED_FILES):
        if name.endswith(".py"):
            compile((project / name).read_text(), name, "exec")


def test_the_dockerfile_builds_on_byocs_image_and_names_the_processor(project: Path) -> None:
    lines = [line.strip() for line in (project / "Dockerfile").read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    assert instructions[:2] == ["ARG BYOC_IMAGE=byoc:local", "FROM ${BYOC_IMAGE}"]
    assert "COPY demo_fx/ /app/demo_fx/" in instructions
    assert "ENV BYOC_PROCESSOR=demo_fx.processor:DemoFx \\" in instructions
    assert "BYOC_CAPABILITY_NAME=demo-fx" in instructions
    # the build context keeps what the COPY needs
    assert (project / ".dockerignore").read_text().splitlines()[:2] == ["*", "!demo_fx/"]


def test_the_readme_has_the_commands_that_matter(project: Path) -> None:
    readme = (project / "README.md").read_text()
    assert "byoc orchestrator &" in readme
    assert "byoc serve demo_fx.processor:DemoFx --capability-name demo-fx" in readme
    assert '"model_id":"demo-fx"' in readme
    assert "byoc check demo_fx.processor:DemoFx" in readme
    assert "docker build -t demo-fx:local ." in readme


def test_the_processor_loads_as_byoc_serve_loads_it(project: Path) -> None:
    code = (
        "from byoc.processor import load_processor\n"
        "p = load_processor('demo_fx.processor:DemoFx', {'strength': '0.25'})\n"
        "print(type(p).__name__, p.default_strength)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(project)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=project, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["DemoFx", "0.25"]


def test_the_generated_test_passes(project: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(project)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(project / "tests")],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout


def test_an_existing_folder_is_refused_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "demo-fx").mkdir()
    (tmp_path / "demo-fx" / "mine.txt").write_text("keep me")
    result = _byoc("init", "demo-fx", cwd=tmp_path)
    assert result.returncode == 2
    assert "exists already" in result.stderr
    assert _files(tmp_path) == {"demo-fx/mine.txt"}
    assert (tmp_path / "demo-fx" / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("1fx", "not a valid project name"),
        ("demo fx", "not a valid project name"),
        ("../escape", "not a valid project name"),
        ("demo--fx", "not a valid project name"),
        ("demo-", "not a valid project name"),
        ("json", "standard-library module"),
        ("class", "keyword"),
        ("byoc", "byoc's own names"),
    ],
)
def test_a_name_that_cannot_be_a_project_is_refused(tmp_path: Path, name: str, why: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    result = _byoc("init", name, cwd=work)
    assert result.returncode == 2
    assert why in result.stderr
    assert list(tmp_path.rglob("*")) == [work]


def test_dir_puts_the_project_elsewhere_and_must_be_a_folder(tmp_path: Path) -> None:
    result = _byoc("init", "Demo.FX", "--dir", str(tmp_path / "missing"), cwd=tmp_path)
    assert result.returncode == 2
    assert "is not a folder" in result.stderr
    (tmp_path / "projects").mkdir()
    result = _byoc("init", "Demo.FX", "--dir", "projects", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    root = tmp_path / "projects" / "Demo.FX"
    assert (root / "demo_fx" / "processor.py").read_text().count("class DemoFX(Processor)") == 1


def test_names_derived_from_the_project_name() -> None:
    assert (project_names("demo-fx").package, project_names("demo-fx").class_name) == ("demo_fx", "DemoFx")
    assert project_names("processor").class_name == "ProcessorProcessor"
    with pytest.raises(ScaffoldError):
        create_project("a b")
