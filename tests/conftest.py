import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SIDE_BY_SIDE = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if SIDE_BY_SIDE:
    # test files side by side (make test: two processes on two cores): one torch thread in each,
    # and in the processes they start, so that no process's threads wait on cores the other's
    # use (oversubscribed OpenMP threads spin), and a run in a test and its copy in a
    # subprocess use the same number of threads (the same rounding)
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1 if SIDE_BY_SIDE else min(2, os.cpu_count() or 1))


import pytest  # noqa: E402

from tests.helpers import (LLM_DIM, PROMPTS, convergence_cfg, install_cheap_parts,  # noqa: E402
                           write_standin)


@pytest.fixture(scope="session")
def make_surd():
    """A function that writes ``n`` tiny SURD rows to ``root`` (random 32x32 PNGs seeded with 0,
    ``text`` cycling through ``prompts``, ``prompt`` from ``caption``) and returns ``root``: the
    dataset of the training and bad-input tests."""
    import numpy as np
    from PIL import Image

    from sur_lib.infra.surd_files import write_metadata

    def make(root, prompts, n, caption="{i} red circles"):
        rng = np.random.default_rng(0)
        rows = []
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
            rows.append({"file_name": f"{i}.png", "text": prompts[i % len(prompts)],
                         "prompt": caption.format(i=i)})
        write_metadata(root, rows)
        return root

    return make


@pytest.fixture(scope="session")
def surd(tmp_path_factory, make_surd):
    """8 tiny SURD rows + a knowledge-vector cache, on disk (the CLI reads them). Read-only: built
    once per test process and shared by the training, channel, oracle and step-cache tests."""
    from sur_lib.infra.knowledge_files import save_knowledge

    root = make_surd(tmp_path_factory.mktemp("surd"), PROMPTS, 8, "{i} red circles, best quality")
    gen = torch.Generator().manual_seed(0)
    save_knowledge(root / "knowledge.safetensors", PROMPTS, torch.randn(len(PROMPTS), LLM_DIM, generator=gen),
                   meta={"llm": "random", "layer": -1, "include_bos": True, "batch_size": 1})
    return root


@pytest.fixture(scope="session")
def standin(tmp_path_factory):
    """The random stand-in base model (``helpers.write_standin``), loaded once per test process
    and shared read-only by the convergence, recipe, re-test and tune tests."""
    from sur_lib.models import load_tiny_backbone

    folder = tmp_path_factory.mktemp("standin")
    write_standin(folder)
    return load_tiny_backbone(folder)


@pytest.fixture(scope="session")
def trained(standin, tmp_path_factory):
    """One uninterrupted convergence training run (adapters at steps 0, 2, 4) on ``standin``:
    its ConvergenceConfig, read-only, shared by the convergence and recipe tests."""
    from sur_lib.study.experiments import convergence as conv

    tmp = tmp_path_factory.mktemp("straight")
    mp = pytest.MonkeyPatch()
    try:
        install_cheap_parts(mp, tmp)
        cc = convergence_cfg(tmp, phase="train")
        conv.run(cc, backbone=standin)
    finally:
        mp.undo()
    return cc


@pytest.fixture
def cheap(monkeypatch, tmp_path):
    """Random knowledge vectors and a fake judge (the real ones are tested elsewhere); the list of
    the fake judge's calls."""
    return install_cheap_parts(monkeypatch, tmp_path)


# The files that hold the longest tests are collected first: `make test` runs the tests in two
# processes (pytest-xdist, --dist loadfile --no-loadscope-reorder), which take whole files in
# collection order, so a long file started last would leave one process working alone at the
# end. The order comes from `pytest --durations=0` (file totals, longest first); it changes
# nothing else, and a file not listed keeps its place after these.
LONGEST_FILES = ("test_experiments.py", "test_train.py", "test_webdemo.py", "test_book_export.py",
                 "test_knowledge.py", "test_guidance.py", "test_verify_forgery.py", "test_bad_inputs.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
