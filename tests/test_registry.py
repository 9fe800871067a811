"""The experiments' registry is the one list of commands (issue 25): every experiment module is
in it, the command line, verify's dispatch and the listing in ``--help`` come from it, and a
new experiment needs its module and one entry, nothing else (``test_one_entry_is_enough``)."""
from __future__ import annotations

import ast
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sur_lib.study import claims
from sur_lib.study.experiments import command, common, registry, verify

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "sur_lib" / "study" / "experiments"


def _defines(path: Path) -> set[str]:
    return {n.name for n in ast.parse(path.read_text(encoding="utf-8")).body
            if isinstance(n, ast.FunctionDef)}


def test_every_experiment_module_is_registered():
    """A module of experiments/ with a runner (``run_<module>``), a command line of its own
    (``main``) or a verify hook (``verify_<module>``) is a registered command's module."""
    registered = {e.module for e in registry.COMMANDS.values()}
    for path in sorted(FOLDER.glob("*.py")):
        if path.stem in ("__init__", "__main__", "command", "registry"):
            continue
        defs = _defines(path)
        if defs & {f"run_{path.stem}", "main", f"verify_{path.stem}"}:
            assert f"{registry.PACKAGE}.{path.stem}" in registered, (
                f"{path.name} has a runner, main or verify hook but no entry in registry.COMMANDS")


def test_every_entry_names_what_exists():
    for name, e in registry.COMMANDS.items():
        assert e.name == name and e.about.strip()
        if e.own_command_line:
            assert e.runner is None and callable(e.main_function()), name
        else:
            assert inspect.isclass(e.config_class()) and callable(e.run_function()), name
        if e.result:
            hook = e.verify_hook()
            # the one signature: hook(doc, backbone, digest, draws, progress, out)
            inspect.signature(hook).bind(*[None] * 6)
            assert e.part in (0, 1) and e.keys, name


def test_command_choices_are_the_registry():
    choices = next(a.choices for a in command.parser()._actions if a.dest == "name")
    assert list(choices) == list(registry.COMMANDS)
    text = command.description()
    for name in registry.COMMANDS:
        assert f"* ``{name}`` -- " in text
    assert "verify" in registry.COMMANDS and "verify" not in registry.EXPERIMENTS


def test_verify_covers_every_result():
    assert "EXPERIMENTS" not in vars(common)  # one list: the registry's
    assert sorted(sum(verify.PARTS, ())) == sorted(registry.EXPERIMENTS)
    for path in sorted((ROOT / "data" / "results").glob("*.json")):
        doc = json.loads(path.read_text())
        cmd = (doc.get("command") or "") if isinstance(doc, dict) else ""
        for prefix in ("python -m sur_lib.experiments ", "python -m sur_lib.study.experiments "):
            if cmd.startswith(prefix):  # a result of NAME (not ``experiments.compose``'s bench)
                name = cmd[len(prefix):].split()[0]
                assert name in registry.EXPERIMENTS, f"{path.name}: {name} is not registered"
                assert path.stem in (name, f"{name}.partial")
    for name in registry.EXPERIMENTS:
        assert (ROOT / "data" / "results" / f"{name}.json").is_file(), name


def test_claims_read_registered_results():
    assert set(claims.RESULT_FILES) | set(claims.LATER_FILES) <= set(registry.EXPERIMENTS)


# ------------------------------------------------------------------------- a new experiment


@dataclass
class FakeConfig(common.ExperimentConfig):
    pass


def run_fake(exp: FakeConfig, backbone=None) -> dict:
    return {"experiment": "fake", "model": {"unet_digest": "x"}, "seed": exp.seed, "generation": {},
            "conditions": {}, "wall_time_s": 0.0}


CALLS = []


def verify_fake(doc, backbone, digest, draws, progress, out):
    CALLS.append((doc["experiment"], digest, draws, progress, out))
    return [{"check": "fake: stored seed", "ok": doc["seed"] == 3, "message": f"seed {doc['seed']}"}]


class _Stub:
    unet = torch.nn.Linear(1, 1)


def test_one_entry_is_enough(tmp_path, monkeypatch, capsys):
    """A new experiment: its module (here this file) and one entry; the command line runs it
    and writes its result, verify checks that result with its hook."""
    entry = registry.Experiment("fake", __name__, about="a test's experiment", config="FakeConfig",
                                runner="run_fake", verify=f"{__name__}:verify_fake")
    monkeypatch.setattr(registry, "COMMANDS", {**registry.COMMANDS, "fake": entry})
    monkeypatch.setattr(registry, "EXPERIMENTS", (*registry.EXPERIMENTS, "fake"))
    assert command.main(["fake", "--seed", "3", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "fake.json").read_text())["seed"] == 3
    CALLS.clear()
    assert command.main(["verify", "--only", "fake", "--out", str(tmp_path), "--no-progress", "--seed", "1"],
                        backbone=_Stub()) == 0
    assert CALLS == [("fake", verify.state_digest(_Stub.unet), verify.VERIFY_DRAWS, False, tmp_path)]
    assert "ok   fake: stored seed: seed 3" in capsys.readouterr().out
    monkeypatch.undo()
    with pytest.raises(SystemExit):  # and without its entry there is no such command
        command.main(["fake", "--out", str(tmp_path)])
