"""The glossary names the functions that compute each term: every one of them exists."""
import importlib
import re
from pathlib import Path

BOOK = Path(__file__).resolve().parents[1] / "book"


def test_every_function_the_glossary_names_exists():
    names = set(re.findall(r"`(sur_lib(?:\.\w+)+)`", (BOOK / "glossary.md").read_text()))
    assert names, "the glossary names no sur_lib function"
    missing = []
    for name in sorted(names):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                missing.append(name)
            break
        else:
            missing.append(name)
    assert not missing, f"the glossary names what sur_lib does not have: {missing}"
