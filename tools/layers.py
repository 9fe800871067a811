"""sur_lib's layers, read from the tree: lines per module and per layer, and the import graph.

    python tools/layers.py            # the table: layer, module, lines
    python tools/layers.py --imports  # every module's sur_lib imports (function-level ones too)

The package has three layers and one kind of support code:

* **method** (``sur_lib/*.py`` at the top): the adapter, losses, knowledge vectors, SURD data,
  backbones, training, generation and the guidance extensions. It imports neither world nor
  study.
* **world** (``sur_lib/world/``): the SUR world (renderer and scenes, SURD-mini, prompt sets,
  the base model's pretraining, the judge) and every path into the repository's ``data/``
  (``paths``). It does not import the study.
* **study** (``sur_lib/study/``): statistics, claims, the experiments and everything that
  measures or presents the method in the world. It may import every other layer.
* **infrastructure** (``sur_lib/infra/``): file I/O, checkpoints, a training run's bookkeeping
  and seeded micro-batches, config typing and checking (the train command's line too),
  provenance, the command-line errors, the headless browser, loading the LLMs and the text
  encoders' files offline, the knowledge-file formats, the extraction command, SURD's files (a
  folder's metadata.jsonl and images read and checked, the Hub copy), an adapter folder's
  manifest and checks, a backbone's files (a folder or the Hub, the bundled SD 1.5 configs) and
  its random-weight builds, and the argument checks of generation and of the guidance
  extensions. It imports no layer.

A few modules only keep the ``python -m sur_lib....`` commands that stored results name
working (layer ``alias``, ``ALIASES``). In a tree from before the layers existed, ``BEFORE``
says where each module was going, so the same script measures before and after.
``tests/test_layers.py`` checks the rules with ``imports`` and ``layer_of``.
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sur_lib"
LAYERS = ("method", "world", "study", "infrastructure")
FOLDERS = {"infra": "infrastructure", "world": "world", "study": "study"}
# what each layer may import besides itself and the package root ``sur_lib`` (its version);
# an alias may import anything
ALLOWED = {"infrastructure": set(), "method": {"infrastructure"},
           "world": {"method", "infrastructure"}, "study": {"method", "world", "infrastructure"}}
# the old command names that stored results record (python -m ...): thin forwarders, folders
# with a __main__.py and no __init__.py
ALIASES = ("sur_lib.experiments", "sur_lib.bench", "sur_lib.step_cache", "sur_lib.evaluate",
           "sur_lib.pretrain")
# the tree before the layers (the modules' names then -> their layer)
BEFORE = {
    "fileio": "infrastructure", "checkpoints": "infrastructure", "config": "infrastructure",
    "provenance": "infrastructure", "cli": "infrastructure", "headless": "infrastructure",
    "toyworld": "world", "surd_stats": "world", "extended_prompts": "world", "pretrain": "world",
    "evaluate": "world", "experiments.prompts": "world",
    "analysis": "study", "claims": "study", "oracle": "study", "gradient_share": "study",
    "step_cache": "study", "bench": "study", "book": "study", "book_export": "study",
    "webdemo": "study", "quickstart": "study", "experiments": "study",
}


def module_name(path: Path) -> str:
    """sur_lib/world/toyworld.py -> sur_lib.world.toyworld; a package's __init__.py -> its name."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of sur_lib, by name."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(name: str) -> str:
    """The layer of a module (``sur_lib.x.y``): by its folder, or ``BEFORE`` in an old tree."""
    parts = name.split(".")[1:]
    if not parts:
        return "package"  # sur_lib/__init__.py: the docstring and __version__
    if (PACKAGE / "study").is_dir():  # the layered tree
        if parts[0] in FOLDERS:
            return FOLDERS[parts[0]]
        if any(name == a or name.startswith(a + ".") for a in ALIASES):
            return "alias"
        return "method"
    for i in range(len(parts), 0, -1):  # the longest known prefix
        if ".".join(parts[:i]) in BEFORE:
            return BEFORE[".".join(parts[:i])]
    return "method"


def imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """The sur_lib modules that module ``name`` (file ``path``) imports, wherever the import
    statement is (module level or inside a function). ``from pkg import x`` counts as
    importing ``pkg.x`` when that is a module, else ``pkg``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [(target, a.name) for a in node.names]
        else:
            continue
        for target, member in targets:
            if not (target == "sur_lib" or target.startswith("sur_lib.")):
                continue
            if member and f"{target}.{member}" in known:
                out.add(f"{target}.{member}")
            else:
                while target not in known and "." in target:
                    target = target.rpartition(".")[0]
                out.add(target)
    out.discard(name)
    return out


def graph() -> dict[str, set[str]]:
    """module -> the sur_lib modules it imports."""
    known = modules()
    return {n: imports(p, n, known) for n, p in known.items()}


def lines() -> dict[str, int]:
    return {n: len(p.read_text(encoding="utf-8").splitlines()) for n, p in modules().items()}


def table() -> str:
    n_lines = lines()
    per_layer = defaultdict(int)
    rows = []
    for name, n in sorted(n_lines.items(), key=lambda kv: (layer_of(kv[0]), kv[0])):
        per_layer[layer_of(name)] += n
        rows.append(f"{layer_of(name):15} {name:45} {n:6}")
    total = sum(n_lines.values())
    rows.append("")
    for layer in (*LAYERS, "package", "alias"):
        if per_layer[layer]:
            rows.append(f"{layer:15} {'(all)':45} {per_layer[layer]:6}  {per_layer[layer] / total:4.0%}")
    rows.append(f"{'total':15} {'':45} {total:6}")
    return "\n".join(rows)


if __name__ == "__main__":
    if "--imports" in sys.argv[1:]:
        for name, deps in sorted(graph().items()):
            print(f"{name} [{layer_of(name)}] -> " + ", ".join(sorted(deps)))
    else:
        print(table())
