"""The package's layering, checked by reading every module's imports (ast).

Each module sits in a layer; a module may import modules of its own layer or
of lower ones, never of a higher one. Each third-party library is imported by
the modules that own its concern only. The mock server imports nothing from
the rest of batcher. Imports under ``if TYPE_CHECKING:`` are left out: they
only name types and run nothing.

Adding a module: put its name in ``LAYERS`` (the lowest layer whose modules
it may import); adding a library: name its owners in ``OWNERS``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

import batcher

PACKAGE = Path(batcher.__file__).resolve().parent
PYPROJECT = PACKAGE.parent / "pyproject.toml"

#: Lowest first. A module imports its own layer or lower ones only. A dotted
#: name (``mock_server``) covers every module of that subpackage.
LAYERS: tuple[tuple[str, ...], ...] = (
    # leaves: import nothing from batcher (the package facade loads lazily)
    ("__init__", "errors", "records", "redact", "pricing", "mock_server", "tally", "schema_guard",
     "structured"),
    # the job's validated settings and loading them; prompts, token counts, the display
    ("config", "jobload", "prompts", "tokens", "progress"),
    # reading inputs, writing results, private files
    ("io",),
    # talking to the server: the wire format, HTTP clients, endpoints
    ("transport",),
    # what a run keeps: checkpoint, key index, journals, answers, request keys
    ("store",),
    # pacing, cluster leases, budget, retry policy
    ("limits",),
    # what a job means, shared by every driver: checks before, one row's path, the results write
    ("plan",),
    # public fakes for embedders and tests: FunctionSender (plan's), a fake clock, the mock server
    ("testing",),
    # the online driver (batch mode's fallback still imports it)
    ("online",),
    # the other drivers, and what reads a run's results: summary, status, report
    ("batch", "raydata", "reporting"),
    # a validated job run end to end: what the CLI and the API share
    ("jobs",),
    # the Python API (the package: calls, frames, job files, results, the sync bridge)
    ("api",),
    # the command line
    ("cli", "__main__"),
)

#: Which modules may import each third-party library (by top-level import name).
#: ``None``: any module may.
OWNERS: dict[str, tuple[str, ...] | None] = {
    "pyarrow": ("io.inputs", "io.inputscan", "io.outputs", "io.schema_columns", "raydata"),
    # raydata: Ray hands its workers Arrow tables
    "ray": ("raydata",),  # optional (the ray extra), imported only by run --ray
    "pandas": ("io.inputscan", "io.outputs", "api.frames", "api.results", "reporting.page"),
    "numpy": None,  # compact per-row arrays wherever rows are counted or keyed
    "matplotlib": ("reporting.charts",),
    "genai_prices": ("pricing",),
    "tiktoken": ("tokens",),
    "bpe_openai": ("tokens",),
    "aiohttp": ("transport.client", "mock_server"),
    "tqdm": ("progress",),
    "ipywidgets": ("progress",),  # optional (the notebook extra): the progress widget
    "click": ("cli",),
    "pydantic": ("config", "jobload"),
    "yaml": ("jobload",),
    "orjson": None,
    "jsonschema": ("structured", "schema_guard"),
    "referencing": ("schema_guard",),  # jsonschema's references: a registry that fetches nothing
    "re2": ("schema_guard",),  # google-re2: schema patterns matched in linear time
}

#: The mock server imports nothing from batcher (a client bug cannot be
#: mirrored in the fake that tests it).
INDEPENDENT = ("mock_server",)


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, relative to batcher: "runner", "mock_server.app"
    target: str  # the absolute name imported: "batcher.errors", "pyarrow.csv"
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def runtime_imports(path: Path) -> Iterator[Import]:
    """Every import that runs (anywhere in the file), relative ones made absolute."""
    module = module_name(path)
    here = ["batcher", *path.relative_to(PACKAGE).parent.parts]  # what "." means in the file
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            type_only |= {id(inner) for statement in node.body for inner in ast.walk(statement)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            source = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                # ``from batcher import jobs`` imports the module batcher.jobs
                submodule = f"{source}.{alias.name}"
                yield Import(module, submodule if _is_module(submodule) else source, node.lineno)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_module(dotted: str) -> bool:
    if dotted.split(".")[0] != "batcher":
        return False
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def rank(module: str) -> int | None:
    """The layer of ``module`` (``mock_server.app`` is in ``mock_server``'s), or None."""
    for index, layer in enumerate(LAYERS):
        for entry in layer:
            if module == entry or module.startswith(entry + "."):
                return index
    return None


def _own(name: str) -> str:
    """``batcher.mock_server.app`` -> ``mock_server.app``; ``batcher`` -> ``__init__``."""
    return name.removeprefix("batcher").removeprefix(".") or "__init__"


ALL_IMPORTS = [found for path in modules() for found in runtime_imports(path)]


def test_every_module_has_a_layer() -> None:
    missing = sorted({module_name(path) for path in modules()
                      if rank(module_name(path)) is None})
    assert not missing, (
        f"batcher modules without a layer: {', '.join(missing)}. Add each to LAYERS in "
        "tests/test_layering.py, in the lowest layer whose modules it imports (a module may "
        "import its own layer and lower ones).")


def test_no_module_imports_a_higher_layer() -> None:
    wrong = []
    for found in ALL_IMPORTS:
        if found.target != "batcher" and not found.target.startswith("batcher."):
            continue
        mine, theirs = rank(found.module), rank(_own(found.target))
        if mine is None or theirs is None:
            continue  # reported by test_every_module_has_a_layer
        if theirs > mine:
            wrong.append(f"{found.module}:{found.line} imports {found.target} "
                         f"(layer {theirs} above its own {mine})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_each_library_is_imported_by_its_owners_only() -> None:
    stdlib = set(sys.stdlib_module_names)
    wrong = []
    for found in ALL_IMPORTS:
        top = found.target.split(".")[0]
        if top in stdlib or top == "batcher" or top == "__future__":
            continue
        if top not in OWNERS:
            wrong.append(f"{found.module}:{found.line} imports {top}, which OWNERS in "
                         "tests/test_layering.py does not list: add it with the modules that "
                         "own its concern")
            continue
        owners = OWNERS[top]
        if owners is not None and not any(found.module == owner
                                          or found.module.startswith(owner + ".")
                                          for owner in owners):
            wrong.append(f"{found.module}:{found.line} imports {found.target}; only "
                         f"{', '.join(owners)} may")
    assert not wrong, "\n".join(wrong)


def test_the_mock_server_imports_nothing_from_batcher() -> None:
    wrong = [f"{found.module}:{found.line} imports {found.target}" for found in ALL_IMPORTS
             if found.module.split(".")[0] in INDEPENDENT
             and found.target.startswith("batcher.")
             and _own(found.target).split(".")[0] != found.module.split(".")[0]]
    assert not wrong, "\n".join(wrong)


def test_every_library_imported_is_a_declared_dependency() -> None:
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    extras = [line for extra, lines in project["optional-dependencies"].items()
              if extra != "dev" for line in lines]  # optional features, not the test tools
    declared = {_requirement_name(line) for line in [*project["dependencies"], *extras]}
    distributions = packages_distributions()
    undeclared = sorted({
        top for found in ALL_IMPORTS
        if (top := found.target.split(".")[0]) in OWNERS
        and not {_requirement_name(name) for name in distributions.get(top, [])} & declared})
    assert not undeclared, f"imported but not in pyproject.toml's dependencies: {undeclared}"


def _requirement_name(requirement: str) -> str:
    name = requirement
    for stop in "<>=!~[; ":
        name = name.split(stop, 1)[0]
    return name.strip().lower().replace("_", "-")


def test_the_tables_name_only_modules_that_exist() -> None:
    existing = {module_name(path) for path in modules()}
    named = {entry for layer in LAYERS for entry in layer}
    named |= {owner for owners in OWNERS.values() if owners for owner in owners}
    stale = sorted(name for name in named
                   if not any(module == name or module.startswith(name + ".")
                              for module in existing))
    assert not stale, f"LAYERS/OWNERS name modules that no longer exist: {stale}"


@pytest.mark.parametrize("statement", [
    "import batcher",
    "import batcher.errors",
    "import batcher.mock_server",
    "from batcher.testing import FakeClock, MockConfig",
    "from batcher import ConfigError, __version__",
])
def test_light_imports_do_not_load_the_heavy_libraries(statement: str) -> None:
    heavy = ("pandas", "pyarrow", "aiohttp")
    code = f"import sys\n{statement}\nprint(' '.join(n for n in {heavy!r} if n in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "", f"{statement!r} loaded {result.stdout.strip()}"


def test_the_lazy_facade_gives_every_public_name() -> None:
    for name in batcher.__all__:
        assert getattr(batcher, name) is not None, name
    assert set(batcher.__all__) <= set(dir(batcher))
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        _ = batcher.nothing_here  # type: ignore[attr-defined]
