"""Architecture checks: the import-linter contracts in pyproject.toml, packaging, ``__all__``.

The ``kfloop`` import package is assembled from several top-level folders
(``[tool.setuptools.package-dir]``: ``components/`` -> ``kfloop.components`` and so on).
import-linter (grimp) finds a package's modules by walking its one folder, so a bare
``lint-imports`` in the repository would only see ``kfloop/``. The contracts are therefore
checked on a copy of the sources laid out as the installed package (one ``kfloop/`` tree),
built from the same package-dir table. To run them by hand::

    .venv/bin/python tests/test_architecture.py
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.resources
import os
import pkgutil
import shutil
import subprocess
import sys
import tempfile
import textwrap
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
CONFIG = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
SETUPTOOLS = CONFIG["tool"]["setuptools"]
PACKAGE_DIR: dict[str, str] = SETUPTOOLS["package-dir"]
PACKAGES: list[str] = SETUPTOOLS["packages"]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def source_dir(package: str) -> Path:
    """The folder that holds ``package`` (the longest package-dir entry that contains it)."""
    parts = package.split(".")
    for i in range(len(parts), 0, -1):
        mapped = PACKAGE_DIR.get(".".join(parts[:i]))
        if mapped is not None:
            return REPO / mapped / Path(*parts[i:])
    return REPO / Path(*parts)


def assemble(dest: Path) -> Path:
    """Copy the sources into ``dest`` laid out as the installed ``kfloop`` package.

    A listed package that has no ``__init__.py`` yet gets an empty one in the copy, so the
    contracts still see its modules (``test_package_has_init_file`` reports the missing file).
    """
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in sorted(PACKAGE_DIR, key=lambda name: name.count(".")):
        shutil.copytree(REPO / PACKAGE_DIR[package], dest / Path(*package.split(".")), ignore=ignore, dirs_exist_ok=True)
    for package in PACKAGES:
        init = dest / Path(*package.split(".")) / "__init__.py"
        if not init.exists():
            init.parent.mkdir(parents=True, exist_ok=True)
            init.touch()
    return dest


def lint_imports(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``lint-imports`` on ``config`` with ``cwd`` first on the import path (as lint-imports does)."""
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} is missing: install the test extra (pip install -e '.[test]')")
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", str(config)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# -- import-linter contracts ------------------------------------------------------------


def test_import_contracts_hold(tmp_path: Path) -> None:
    result = lint_imports(PYPROJECT, assemble(tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"lint-imports failed (exit {result.returncode}):\n{output}"
    # Sanity: the whole assembled package was analysed, not only the folder kfloop/.
    assert "KEPT" in output and "BROKEN" not in output, output


def _contract(contract_id: str) -> dict:
    for contract in CONFIG["tool"]["importlinter"]["contracts"]:
        if contract.get("id") == contract_id:
            return contract
    raise AssertionError(f"no import-linter contract with id {contract_id!r} in pyproject.toml")


@pytest.mark.parametrize("with_cycle", [True, False], ids=["cycle", "no-cycle"])
def test_cycle_contract_type_catches_a_cycle(tmp_path: Path, with_cycle: bool) -> None:
    """The contract type used for "no cycles" fails on a two-module cycle (and passes without it)."""
    contract_type = _contract("acyclic")["type"]
    package = tmp_path / "cyclepkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("import cyclepkg.b\n")
    (package / "b.py").write_text("import cyclepkg.a\n" if with_cycle else "import json\n")
    config = tmp_path / ".importlinter"
    config.write_text(
        textwrap.dedent(
            f"""\
            [importlinter]
            root_package = cyclepkg

            [importlinter:contract:acyclic]
            name = No cycles in cyclepkg
            type = {contract_type}
            ancestors = cyclepkg
            """
        )
    )
    result = lint_imports(config, tmp_path)
    output = result.stdout + result.stderr
    if with_cycle:
        assert result.returncode != 0, output
        assert "BROKEN" in output, output  # broken contract, not a configuration error
    else:
        assert result.returncode == 0, output


# -- packaging --------------------------------------------------------------------------


def _source_packages() -> set[str]:
    """Every folder with Python files under the package-dir folders, as a dotted package name."""
    found = set()
    for package, folder in PACKAGE_DIR.items():
        root = REPO / folder
        for directory in [root, *(p for p in root.rglob("*") if p.is_dir())]:
            if "__pycache__" in directory.parts or not any(directory.glob("*.py")):
                continue
            relative = directory.relative_to(root).parts
            found.add(".".join([package, *relative]))
    return found


def test_every_source_package_is_listed_in_pyproject() -> None:
    missing = _source_packages() - set(PACKAGES)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml (else not shipped): {sorted(missing)}"


@pytest.mark.parametrize("package", PACKAGES)
def test_package_has_init_file(package: str) -> None:
    assert (source_dir(package) / "__init__.py").is_file(), f"{package}: {source_dir(package)}/__init__.py is missing"


def _packages_and_subpackages() -> list[str]:
    names = set(PACKAGES)
    for package in PACKAGES:
        if (source_dir(package) / "__init__.py").is_file():
            names.update(
                info.name
                for info in pkgutil.walk_packages([str(source_dir(package))], prefix=f"{package}.")
                if info.ispkg
            )
    return sorted(names)


@pytest.mark.parametrize("package", _packages_and_subpackages())
def test_package_defines_all(package: str) -> None:
    module = importlib.import_module(package)
    assert getattr(module, "__file__", None), f"{package} is a namespace package (no __init__.py)"
    assert hasattr(module, "__all__"), f"{package} ({module.__file__}) defines no __all__"
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, f"{package}.__all__ names what the package does not define: {missing}"


def test_manifest_yaml_ships_as_package_data() -> None:
    """Every YAML file under manifests/ matches a package-data glob and is reachable at run time."""
    patterns = SETUPTOOLS["package-data"]["kfloop.manifests"]
    root = source_dir("kfloop.manifests")
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.yaml"))
    assert files
    unshipped = [f for f in files if not any(fnmatch.fnmatchcase(f, pattern) for pattern in patterns)]
    assert not unshipped, f"not matched by package-data {patterns}: {unshipped}"
    resources = importlib.resources.files("kfloop.manifests")
    for name in files:
        assert resources.joinpath(name).is_file(), name


if __name__ == "__main__":  # run the contracts by hand on an assembled copy
    with tempfile.TemporaryDirectory() as tmp:
        completed = subprocess.run(
            [str(LINT_IMPORTS), "--no-cache", str(PYPROJECT)], cwd=assemble(Path(tmp)), env={**os.environ, "PYTHONPATH": tmp}
        )
    sys.exit(completed.returncode)


def test_module_docstrings_say_what_a_module_owns_in_at_most_twenty_lines() -> None:
    """Design notes belong in docs/: no module docstring of the package is over 20 lines."""
    import ast

    long = []
    for folder in ("kfloop", "serving", "policies", "components", "pipelines", "manifests"):
        for path in sorted((REPO / folder).rglob("*.py")):
            docstring = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
            if docstring.count("\n") + 1 > 20:
                long.append(f"{path.relative_to(REPO)}: {docstring.count(chr(10)) + 1} lines")
    assert long == []
