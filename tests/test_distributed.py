"""Two training processes on CPU (torchrun, gloo), both adapters.

Checks what only shows with several processes: that there really are two (accelerate joins
torchrun's processes on CPU only when told cpu=True; otherwise each one trains alone), one
log.csv of the losses averaged over the processes, the knowledge vectors computed once (the
main process loads the LLM, the other one reads its cache), identical final weights, and the
same numbers as one process with gradient accumulation over the same micro-batches (process p
of 2 at step s takes micro-step 2s + p, as the accumulating run does at micro-step p).
Kept short (2 steps, tiny random models): these are part of CI on 2 cores.
"""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sur_lib.adapter import SURAdapter
from sur_lib.infra.knowledge_files import load_knowledge
from sur_lib.infra.llms import save_tiny_random_llm
from sur_lib.infra.surd_files import write_metadata
from sur_lib.train import TrainConfig, train
from sur_lib.infra.run_state import digest, read_log

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["four tomatoes in a row", "a stack of three dice", "five limes in a circle",
           "two tents on a field", "one lemon", "six cherries scattered"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """8 SURD rows (32 px) and a tiny random Llama saved to a folder (the LLM of the run)."""
    root = tmp_path_factory.mktemp("world")
    data = root / "surd"
    data.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": PROMPTS[i % len(PROMPTS)],
                     "prompt": f"{i} red circles, best quality"})
    write_metadata(data, rows)
    return {"data": data, "llm": save_tiny_random_llm(root / "llm", PROMPTS)}


def _torchrun(cfg: TrainConfig, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sur_lib.train", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


@pytest.mark.parametrize("official", [False, True], ids=["paper-adapter", "official-adapter"])
def test_two_processes_train_as_one_with_accumulation(world, tmp_path, official):
    cfg = TrainConfig(profile="tiny-random", data_dir=str(world["data"]), llm=str(world["llm"]),
                      llm_layer=-1, output_dir=str(tmp_path / "ddp"), num_layers=1, num_heads=4,
                      ffn_dim=32, batch_size=2, max_steps=2, checkpoint_every=1, learning_rate=1e-3,
                      lambda_llm=1.0, lambda_cp=1.0, official_adapter=official, progress=False)
    proc = _torchrun(cfg, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out  # the whole output: a failing rank may print early

    # two processes ran, as one data-parallel job, and ended with the same weights
    info = json.loads((tmp_path / "ddp" / "processes.json").read_text())
    assert info["num_processes"] == 2
    ranks = sorted(p["process_index"] for p in info["processes"])
    pids = {p["pid"] for p in info["processes"]}
    assert ranks == [0, 1] and len(pids) == 2 and os.getpid() not in pids
    digests = {p["adapter_sha256"] for p in info["processes"]}
    saved = SURAdapter.from_pretrained(tmp_path / "ddp" / "adapter")
    assert digests == {digest(saved)}

    # one log, written once; the knowledge vectors computed by one process only
    assert (tmp_path / "ddp" / "log.csv").read_text().count("\n") == 1 + cfg.max_steps
    assert [r["step"] for r in read_log(tmp_path / "ddp")] == [1, 2]
    assert out.count("knowledge: loading") == 1 and out.count("done:") == 1
    assert out.count("checkpoint saved: step-000002") == 1
    knowledge_file = tmp_path / "ddp" / "knowledge.safetensors"
    assert set(load_knowledge(knowledge_file)) == set(PROMPTS)

    # the gathered losses and the weights are those of one process accumulating 2 micro-batches
    one = train(dataclasses.replace(cfg, output_dir=str(tmp_path / "one"), gradient_accumulation_steps=2,
                                    knowledge_file=str(knowledge_file)))
    terms = ("loss", "l_simple", "l_llm", "l_cp", "grad_norm")
    np.testing.assert_allclose([[r[k] for k in terms] for r in read_log(tmp_path / "ddp")],
                               [[r[k] for k in terms] for r in read_log(tmp_path / "one")], rtol=1e-4)
    a, b = saved.state_dict(), one.adapter.state_dict()
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("self_attn.in_proj_bias"):  # [query; key; value] biases
            # The key bias gets no gradient in exact arithmetic: it adds q.b_k to every score of
            # a query, which softmax ignores. What it gets is rounding noise (which differs
            # between two processes and one accumulating), and Adam divides by the noise's own
            # size, so it moves by noise-driven steps of up to about lr (seen: 1.1e-5 apart).
            # It is held to that bound; the query and value biases to the tolerance below.
            d = x.numel() // 3
            assert (x[d:2 * d] - y[d:2 * d]).abs().max() <= cfg.learning_rate * cfg.max_steps, k
            x, y = torch.cat([x[:d], x[2 * d:]]), torch.cat([y[:d], y[2 * d:]])
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
