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


def test_a_replays_mean_norm_reads_the_cache_and_computes_the_rest_in_batches_unstored(tmp_path, monkeypatch):
    """The oracle teacher's scale in a replay (``runs.replay_mean_norm``): the mean norm of the
    LLM's vectors of every prompt, the cached ones read as they are, the missing ones computed
    in batches of ``NORM_BATCH`` and not written to the cache (which holds one-prompt vectors)."""
    from sur_lib import knowledge
    from sur_lib.infra import llms
    from sur_lib.study.experiments import common, runs
    from sur_lib.train import TrainConfig

    prompts = [" ".join(["word"] * (1 + i % 7)) + f" thing{i}" for i in range(40)]
    folder = llms.save_tiny_random_llm(tmp_path / "llm", prompts)
    monkeypatch.setattr(common, "WORK_DIR", tmp_path / "work")
    cfg = TrainConfig(profile="tiny-random", llm=str(folder), llm_layer=-1, output_dir=str(tmp_path / "run"),
                      progress=False)
    model, tok = llms.load_llm(cfg.llm)
    one_by_one = knowledge.knowledge_vectors(model, tok, prompts, -1, cfg.llm_include_bos, 1, progress=False)
    runs.knowledge_for_config(cfg, prompts[:15], progress=False)  # a third in the cache, one by one
    cache = runs.knowledge_cache(cfg)
    stored = cache.read_bytes()
    sizes = []
    real = knowledge.knowledge_vectors
    monkeypatch.setattr(knowledge, "knowledge_vectors",
                        lambda m, t, ps, *a, **kw: sizes.append((len(ps), a[2])) or real(m, t, ps, *a, **kw))
    norm, width = runs.replay_mean_norm(cfg, prompts + prompts[:3])  # repeats count once
    assert width == one_by_one.shape[1]
    assert sizes == [(25, runs.NORM_BATCH)]  # only the missing prompts, in batches
    assert norm == pytest.approx(float(one_by_one.norm(dim=1).mean()), rel=1e-5)
    assert cache.read_bytes() == stored  # nothing added
    assert runs.replay_mean_norm(cfg, prompts[:15]) == (
        pytest.approx(float(one_by_one[:15].norm(dim=1).mean()), rel=1e-6), width)
