"""sur_lib's three layers, checked on the source: every module's imports, read with ``ast``
(imports inside functions included), against the rules of ``tools/layers.py``:

* the method (``sur_lib/*.py``) imports neither the world nor the study;
* the world (``sur_lib/world/``) does not import the study;
* the infrastructure (``sur_lib/infra/``) imports no layer;
* no import circle between modules, also when the imports that ``verify`` and ``command`` make
  through the experiments' registry (``importlib``, by module path) are counted.
* the method names no path into the repository's ``data/`` (the world owns them), except the
  known ones below, which may only shrink.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sur_layers", ROOT / "tools" / "layers.py")
layers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layers)

# The experiments' registry imports nothing of sur_lib (module paths as strings), so it loads
# on its own, without the experiments package
_rspec = importlib.util.spec_from_file_location(
    "sur_registry", ROOT / "sur_lib" / "study" / "experiments" / "registry.py")
registry = importlib.util.module_from_spec(_rspec)
sys.modules["sur_registry"] = registry
_rspec.loader.exec_module(registry)


def lazy_imports() -> dict[str, set[str]]:
    """The imports that the AST does not see: ``verify`` loads every experiment's verify hook
    through the registry, ``command`` every command's module (its config and runner, or its
    ``main``)."""
    hooks = {e.verify.partition(":")[0] for e in registry.COMMANDS.values() if e.verify}
    return {"sur_lib.study.experiments.verify": hooks,
            "sur_lib.study.experiments.command": {e.module for e in registry.COMMANDS.values()}}


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan), i.e. every set of
    modules that import each other round a circle."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    names = layers.modules()
    assert "sur_lib.adapter" in names and "sur_lib.world.toyworld" in names
    assert {layers.layer_of(n) for n in names} <= {*layers.LAYERS, "package", "alias"}
    for name in names:  # the alias folders hold __main__.py files only
        if layers.layer_of(name) == "alias":
            assert name.endswith(".__main__"), name
    assert layers.layer_of("sur_lib.losses") == "method"
    assert layers.layer_of("sur_lib.study.experiments.verify") == "study"
    assert layers.layer_of("sur_lib.infra.fileio") == "infrastructure"


def test_imports_are_read_from_functions_too(tmp_path):
    """An import inside a function body counts like one at the top of the module."""
    mod = tmp_path / "m.py"
    mod.write_text("import os\n\ndef f():\n    from sur_lib.world import toyworld as tw\n"
                   "    from ..study import claims\n    return tw, claims\n")
    known = {"sur_lib.world", "sur_lib.world.toyworld", "sur_lib.study", "sur_lib.study.claims"}
    assert layers.imports(mod, "sur_lib.world.m", known) == {"sur_lib.world.toyworld",
                                                             "sur_lib.study.claims"}


def test_no_layer_imports_upwards():
    bad = []
    for name, deps in sorted(layers.graph().items()):
        layer = layers.layer_of(name)
        if layer not in layers.ALLOWED:  # the package root and the aliases
            continue
        for dep in sorted(deps):
            other = layers.layer_of(dep)
            if other not in (layer, "package") and other not in layers.ALLOWED[layer]:
                bad.append(f"{name} ({layer}) imports {dep} ({other})")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_import_circle():
    """Before issue 25's registry, ten modules of the experiments imported each other round a
    circle (verify imported every experiment's check, the experiments verify's shared image and
    loss checks, and ``command`` the package for its docstring); the shared checks are now in
    ``experiments.checks``, which imports no experiment, and verify finds the hooks through the
    registry."""
    graph = layers.graph()
    assert not circles(graph), f"import circles: {[sorted(c) for c in circles(graph)]}"
    lazy = lazy_imports()
    known = set(graph)
    for name, deps in lazy.items():
        assert deps <= known, f"the registry names modules that do not exist: {sorted(deps - known)}"
        graph[name] = graph[name] | deps
    found = circles(graph)
    assert not found, f"import circles through the registry: {[sorted(c) for c in found]}"


def test_the_registry_imports_nothing_of_sur_lib():
    """Else a module that reads the table could import round a circle through it."""
    assert layers.graph()["sur_lib.study.experiments.registry"] == set()


def test_circles_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_adapter_owns_w0_and_imports_no_knowledge_file_code():
    """W0 (Eq. 5) is the adapter's: ``sur_lib.adapter`` builds it itself and does not import
    ``sur_lib.knowledge`` (the LLM loading, extraction and knowledge-file formats)."""
    deps = layers.graph()["sur_lib.adapter"]
    assert "sur_lib.knowledge" not in deps, sorted(deps)
    assert deps <= {"sur_lib.infra.adapter_files"}, sorted(deps)


# The paths into the repository's data/ folder that the method still names: the train command's
# defaults for the tiny profile (its data set and base model), which go when that command's
# defaults move out of the method. The world owns these paths (sur_lib.world.paths). Take an
# entry out when it goes; nothing may join.
KNOWN_DATA_PATHS = {("sur_lib.train", "data/surd-mini"), ("sur_lib.train", "data/models/tiny-sur-world")}


def data_paths(path: Path) -> set[str]:
    """The string constants of a module that name a path into the repository's ``data/``: a
    path part ``"data"`` (``ROOT / "data"``) or a text that starts with ``data/``. Docstrings
    (which may show a command line) are left out; f-string parts count."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value.strip()
            if text in ("data", "data/") or text.startswith(("data/", "./data/")):
                found.add(text)
    return found


def test_data_paths_are_found(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text('"""python -m x data/SURD (a docstring: not counted)"""\nfrom pathlib import Path\n'
                   'A = Path(__file__).parents[1] / "data" / "models"\nB = f"data/results/{1}.json"\n'
                   'C = "metadata.jsonl"\n')
    assert data_paths(mod) == {"data", "data/results/"}


def test_the_method_names_no_path_into_data():
    """The method (``sur_lib/*.py``) takes folders as arguments; the world supplies the
    repository's (``sur_lib.world.paths``)."""
    found = {(name, text) for name, path in layers.modules().items() if layers.layer_of(name) == "method"
             for text in data_paths(path)}
    assert found <= KNOWN_DATA_PATHS, f"paths into data/ in the method: {sorted(found - KNOWN_DATA_PATHS)}"
    assert found == KNOWN_DATA_PATHS, (f"these left the method, take them out of KNOWN_DATA_PATHS: "
                                       f"{sorted(KNOWN_DATA_PATHS - found)}")
