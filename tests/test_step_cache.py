"""step_cache: prompt states and decoded images computed once give the same training."""
import dataclasses

import pytest
import torch

from sur_lib.data import SURDDataset
from sur_lib.infra.knowledge_files import load_knowledge
from sur_lib.models import tiny_random_backbone
from sur_lib.study.step_cache import (CachedTextBackbone, DecodedImages, PromptStates, cached_inputs,
                                encoder_digest)
from sur_lib.train import TrainConfig, train
from sur_lib.infra.run_state import read_log
from tests.helpers import PROMPTS


def _cfg(surd, out, **kw):
    return TrainConfig(**{**dict(profile="tiny-random", data_dir=str(surd),
                                 knowledge_file=str(surd / "knowledge.safetensors"), llm="random",
                                 output_dir=str(out), num_layers=1, num_heads=4, ffn_dim=32,
                                 batch_size=4, max_steps=4, checkpoint_every=2,
                                 learning_rate=1e-3, progress=False), **kw})


def test_decoded_images_give_identical_items_flips_included(surd):
    ds = SURDDataset(surd, resolution=32)
    cached = DecodedImages(SURDDataset(surd, resolution=32))
    assert len(cached) == len(ds) and cached.prompts() == ds.prompts()
    for i in range(len(ds)):
        torch.manual_seed(100 + i)
        a, after_a = ds[i], torch.rand(1)
        torch.manual_seed(100 + i)
        b, after_b = cached[i], torch.rand(1)
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert (a["simple"], a["complex"], a["file_name"]) == (b["simple"], b["complex"], b["file_name"])
        assert torch.equal(after_a, after_b)  # the same random numbers were drawn


def test_decoded_images_refuse_random_crops(surd):
    with pytest.raises(ValueError, match="center_crop"):
        DecodedImages(SURDDataset(surd, resolution=32, center_crop=False))


def test_prompt_states_match_the_encoder_and_round_trip(tmp_path):
    bb = tiny_random_backbone(seed=0)
    states = PromptStates.compute(bb, PROMPTS + PROMPTS[:2], batch_size=4)
    assert sorted(states.states) == sorted(PROMPTS)
    direct = bb.encode_prompts(PROMPTS)
    for p, d in zip(PROMPTS, direct):
        torch.testing.assert_close(states.states[p], d, rtol=1e-5, atol=1e-6)
    states.save(tmp_path / "s.safetensors")
    back = PromptStates.load(tmp_path / "s.safetensors")
    assert back.meta == states.meta
    assert all(torch.equal(back.states[p], states.states[p]) for p in PROMPTS)


def test_cache_is_reused_only_for_the_same_encoder_and_prompts(tmp_path):
    path = tmp_path / "s.safetensors"
    bb = tiny_random_backbone(seed=0)
    first = PromptStates.cached(path, bb, PROMPTS)
    again = PromptStates.cached(path, bb, PROMPTS)
    assert again.meta == first.meta
    other = tiny_random_backbone(seed=1)
    assert encoder_digest(other) != encoder_digest(bb)
    assert PromptStates.cached(path, other, PROMPTS).meta["encoder"] == encoder_digest(other)
    fewer = PromptStates.cached(path, other, PROMPTS[:3])
    assert sorted(fewer.states) == sorted(PROMPTS[:3])
    path.write_bytes(b"damaged")
    assert sorted(PromptStates.cached(path, bb, PROMPTS).states) == sorted(PROMPTS)


def test_cached_backbone_falls_back_for_unknown_prompts():
    bb = tiny_random_backbone(seed=0)
    fields = {f.name: getattr(bb, f.name) for f in dataclasses.fields(type(bb))}
    cached = CachedTextBackbone(**fields, prompt_states=PromptStates.compute(bb, PROMPTS[:2]).states)
    torch.testing.assert_close(cached.encode_prompts(PROMPTS[:2]), bb.encode_prompts(PROMPTS[:2]))
    assert cached.misses == 0
    torch.testing.assert_close(cached.encode_prompts(["something new"]), bb.encode_prompts(["something new"]))
    assert cached.misses == 1


def test_cached_training_gives_the_uncached_losses(surd, tmp_path):
    knowledge = load_knowledge(surd / "knowledge.safetensors")
    plain = _cfg(surd, tmp_path / "plain")
    train(plain, knowledge=knowledge)
    bb = tiny_random_backbone(seed=plain.seed)
    ds = SURDDataset(surd, resolution=bb.image_size, knowledge=knowledge)
    cbb, cds = cached_inputs(bb, ds, tmp_path / "states.safetensors")
    fast = _cfg(surd, tmp_path / "fast")
    train(fast, backbone=cbb, dataset=cds, knowledge=knowledge)
    assert cbb.misses == 0  # every prompt came from the cache
    a, b = read_log(plain.output_dir), read_log(fast.output_dir)
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        for k in ("loss", "l_simple", "l_llm", "l_cp"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-9), (ra["step"], k)
