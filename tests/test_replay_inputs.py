"""verify's replays read only the rows and knowledge vectors of the replayed steps
(``runs.replay_inputs``, ``runs.replay_run``), and get the run's losses all the same."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def run(tmp_path, make_surd):
    from sur_lib.models import tiny_random_backbone
    from sur_lib.train import TrainConfig

    prompts = [f"prompt number {i}" for i in range(24)]
    surd = tmp_path / "surd"
    surd.mkdir()
    make_surd(surd, prompts, 24)
    vectors = dict(zip(prompts, torch.randn(len(prompts), 24, generator=torch.Generator().manual_seed(0))))
    cfg = TrainConfig(profile="tiny-random", data_dir=str(surd), llm="random", llm_layer=-1,
                      output_dir=str(tmp_path / "run"), num_layers=1, num_heads=4, ffn_dim=32,
                      batch_size=4, max_steps=3, checkpoint_every=10**6, learning_rate=1e-3, progress=False)
    return cfg, tiny_random_backbone(seed=0), vectors


def test_replay_reads_only_its_rows_and_gets_the_runs_losses(run):
    from sur_lib.infra.run_state import read_log
    from sur_lib.study.experiments import runs
    from sur_lib.train import train

    cfg, backbone, vectors = run
    train(cfg, backbone=backbone, knowledge=vectors)
    straight = read_log(cfg.output_dir)
    asked = []

    def teacher(rows):  # the vectors of the rows the replay reads, and no others
        asked.extend(r["text"] for r in rows)
        return {r["text"]: vectors[r["text"]] for r in rows}

    live = runs.replay_run(cfg, backbone, 3, teacher)
    assert [float(r["loss"]) for r in live] == pytest.approx([float(r["loss"]) for r in straight], rel=1e-6)
    read = runs.rows_read(cfg, 24, [1, 2, 3])
    assert 4 <= len(read) <= 12 and sorted(asked) == sorted(f"prompt number {i}" for i in read)
    ds, _ = runs.replay_inputs(cfg, backbone, [1], teacher)
    assert len(ds) == 24  # the run's length: the same micro-batches
    other = next(i for i in range(24) if i not in runs.rows_read(cfg, 24, [1]))
    with pytest.raises(IndexError, match=f"row {other} is not one the replayed steps read"):
        ds[other]
