"""The package's layering, read from its source (no import is run).

Layers, from the floor up: a module imports only from its own layer or the
ones below, at module level (no import inside a function to dodge a
cycle), and no library module imports the package `__init__`. The command
line and the apps sit on top and may import lazily (to answer `--help`
fast). No method name appears outside its own module, and no library file
is much over 400 lines.
"""

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "keras_adaptive_lora"

#: Module-name prefixes per layer, lowest first.
LAYERS = [
    ("version", "_validation", "backend", "targets"),
    ("core.kernel_view", "core.optimizer_slots"),
    ("core.quantization",),
    ("core.adapter",),
    ("core.method", "core.tree"),
    ("spectral",),
    ("methods",),
    ("reports",),
    ("surgery",),
    ("inspection", "saving", "distribution", "data"),
    ("__init__",),
    ("cli", "apps", "__main__"),
]
TOP = ("cli", "apps", "__main__")
MAX_LINES = 420


def module_name(path):
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(name):
    for rank, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"module {name!r} is in no layer; add it to LAYERS")


def package_imports(tree):
    """`(name, lineno, at_module_level)` for each import of the package."""
    top_level = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "keras_adaptive_lora":
                names = [f"keras_adaptive_lora.{a.name}" for a in node.names]
            elif node.module.startswith("keras_adaptive_lora."):
                names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("keras_adaptive_lora")]
        for name in names:
            out.append((name, node.lineno, id(node) in top_level))
    return out


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def resolve(imported):
    """The module an import names (`keras_adaptive_lora.x.y` -> `x.y`; a
    name imported from the package itself -> that submodule or `__init__`)."""
    rest = imported[len("keras_adaptive_lora."):] if "." in imported else "__init__"
    candidates = [rest]
    while "." in candidates[-1]:
        candidates.append(candidates[-1].rsplit(".", 1)[0])
    for candidate in candidates:
        base = PACKAGE.joinpath(*candidate.split("."))
        if base.with_suffix(".py").exists() or (base / "__init__.py").exists():
            return candidate
    return "__init__"  # a public name of the package


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_respect_the_layers(path):
    name = module_name(path)
    own = layer_of("__init__" if path == PACKAGE / "__init__.py" else name)
    tree = ast.parse(path.read_text())
    for imported, line, module_level in package_imports(tree):
        target = resolve(imported)
        where = f"{path.relative_to(PACKAGE)}:{line} imports {imported}"
        assert layer_of(target) <= own, f"{where}: an upward import"
        if not name.startswith(TOP):
            assert module_level, f"{where} inside a function (a lazy import dodging a cycle?)"
            assert target != "__init__", f"{where}: the package __init__ from inside the package"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_library_file_is_too_long(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines"


def test_no_method_name_outside_its_own_module():
    spelled = re.compile(r"""["'](lora|sr-lora|sr_lora|flexlora|sinc)["']""")
    offenders = []
    for path in SOURCES:
        if module_name(path).startswith("methods"):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if spelled.fullmatch(repr(node.value)) or spelled.fullmatch(f'"{node.value}"'):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value!r}")
    assert not offenders, offenders


def test_layer_table_is_checked_against_a_real_upward_import(tmp_path):
    """The check can fail: an upward import in a core module is caught."""
    tree = ast.parse("from keras_adaptive_lora.surgery import apply_adapters\n")
    (imported, _, _), = package_imports(tree)
    assert layer_of(resolve(imported)) > layer_of("core.adapter")


@pytest.mark.skipif(
    __import__("keras").backend.backend() != "jax",
    reason="a subprocess check of import order; the jax suite runs it",
)
@pytest.mark.parametrize("module", ["keras_adaptive_lora.saving", "keras_adaptive_lora.inspection"])
def test_modules_that_read_the_registry_register_the_built_in_methods(module):
    """The package loads its public names lazily: a module that looks methods
    up by name must import `methods` itself (a fresh process proves it)."""
    import subprocess
    import sys

    code = (
        f"import {module}\n"
        "from keras_adaptive_lora.core.method import method_names\n"
        "print(','.join(method_names()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "KERAS_BACKEND": "jax"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert set(done.stdout.strip().split(",")) >= {"lora", "sr-lora", "flexlora", "sinc"}
