"""sur_lib.guidance: S-CFG (recorded maps, refinement, regions, gamma, the guided prediction)
and delayed conditioning, on tiny random backbones; the compose experiment at --quick scale."""
import json
import re
import shutil

import pytest
import torch
from diffusers import UNet2DConditionModel

from sur_lib import guidance as G
from sur_lib import models as M
from sur_lib.adapter import SURAdapter
from sur_lib.infra.backbone_files import sd15_configs
from sur_lib.infra.random_backbones import seeded
from sur_lib.pipeline import generate, make_pipeline, prompt_embeddings

PROMPTS = ["four tomatoes", "a blue glass with red juice"]
STEPS = 3


@pytest.fixture(scope="module")
def pixel_backbone():
    return M.tiny_random_backbone(text_dim=32, sample_size=8, with_vae=False, seed=0)


@pytest.fixture(scope="module")
def latent_backbone():
    return M.tiny_random_backbone(text_dim=32, sample_size=8, with_vae=True, seed=0)


@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(0)
    a = SURAdapter(text_dim=32, num_layers=1, num_heads=2, ffn_dim=64, eta=1.0, llm_dim=None)
    with torch.no_grad():  # a visibly different conditioning (eta = 1: the adapter's output only)
        for p in a.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return a.eval()


def gen(backbone, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("output_type", "pt")
    kw.setdefault("guidance_scale", 3.0)
    return generate(backbone, kw.pop("prompts", PROMPTS), **kw)


def _record(backbone, max_side=16, batch=2):
    """One UNet call on [uncond; cond] with recording on; returns the store."""
    unet = backbone.unet
    side = unet.config.sample_size
    x = torch.randn(2 * batch, unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(2 * batch, backbone.max_length, unet.config.cross_attention_dim,
                      generator=torch.Generator().manual_seed(1))
    store = G.AttentionStore(max_side)
    with G.recording(unet, store), torch.no_grad():
        store.begin((side, side), slice(batch, 2 * batch))
        out = unet(x, torch.tensor(500), ctx).sample
        store.end()
    return store, x, ctx, out


# ------------------------------------------------------------------------------- recording


def test_recorded_maps_have_the_right_shapes_and_sum_to_one(pixel_backbone):
    store, *_ = _record(pixel_backbone)
    L = pixel_backbone.max_length
    # the tiny UNet: attention at 8x8 (down and up blocks) and 4x4 (mid block)
    assert set(store.maps) == {("self", (8, 8)), ("cross", (8, 8)), ("self", (4, 4)), ("cross", (4, 4))}
    for (kind, (h, w)), maps in store.maps.items():
        for m in maps:
            keys = L if kind == "cross" else h * w
            assert m.shape == (2, h * w, keys)  # conditional half only, heads averaged
            assert torch.allclose(m.sum(-1), torch.ones(2, h * w), atol=1e-5)
            assert (m >= 0).all()
    assert len(store.maps[("self", (8, 8))]) == len(store.maps[("cross", (8, 8))])


def test_recording_leaves_the_unet_output_unchanged_and_is_removed(pixel_backbone):
    before = dict(pixel_backbone.unet.attn_processors)
    store, x, ctx, out = _record(pixel_backbone)
    with torch.no_grad():
        plain = pixel_backbone.unet(x, torch.tensor(500), ctx).sample
    assert torch.equal(out, plain)
    after = pixel_backbone.unet.attn_processors
    assert all(after[k] is before[k] for k in before)


def test_recorded_probabilities_match_the_attention_layer(pixel_backbone):
    """Head-averaged softmax(q k^T * scale) of the conditional half, computed by diffusers'
    own Attention.get_attention_scores."""
    unet = pixel_backbone.unet
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    grabbed = {}
    handle = block.attn2.register_forward_pre_hook(
        lambda mod, args, kwargs: grabbed.update(h=args[0] if args else kwargs["hidden_states"],
                                                 c=kwargs["encoder_hidden_states"]), with_kwargs=True)
    try:
        store, *_ = _record(pixel_backbone)
    finally:
        handle.remove()
    attn = block.attn2
    q = attn.head_to_batch_dim(attn.to_q(grabbed["h"][2:]))
    k = attn.head_to_batch_dim(attn.to_k(grabbed["c"][2:]))
    ref = attn.get_attention_scores(q, k).view(2, attn.heads, q.shape[1], -1).mean(1)
    assert torch.allclose(store.maps[("cross", (8, 8))][0], ref, atol=1e-6)


def test_max_side_selects_the_resolutions(pixel_backbone):
    store, *_ = _record(pixel_backbone, max_side=4)
    assert {hw for _, hw in store.maps} == {(4, 4)}


# ------------------------------------------------------------------------------- maps -> gamma


def test_refine_cross_is_the_power_series_and_keeps_rows_stochastic():
    g = torch.Generator().manual_seed(0)
    S = torch.rand(2, 6, 6, generator=g).softmax(-1)
    A = torch.rand(2, 6, 5, generator=g).softmax(-1)
    P = (S + S @ S + S @ S @ S + S @ S @ S @ S) / 4
    out = G.refine_cross(A, S, terms=4)
    assert torch.allclose(out, P @ A, atol=1e-6)
    assert torch.allclose(out.sum(-1), torch.ones(2, 6), atol=1e-6)
    assert torch.allclose(G.refine_cross(A, torch.eye(6).expand(2, 6, 6), 3), A)  # S = I: no change


def test_gaussian_blur_keeps_constants_and_spreads_a_point():
    c = torch.full((1, 2, 5, 5), 1.7)
    assert torch.allclose(G.gaussian_blur(c), c, atol=1e-6)
    d = torch.zeros(1, 1, 5, 5)
    d[0, 0, 2, 2] = 1.0
    b = G.gaussian_blur(d, 3, 0.5)
    assert abs(float(b.sum()) - 1.0) < 1e-6 and b[0, 0, 2, 2] < 1 and b[0, 0, 2, 1] > 0
    assert b[0, 0, 2, 1] == b[0, 0, 1, 2] == b[0, 0, 3, 2]  # symmetric


def _cfg(**kw):
    return G.SCFGConfig(**{"blur_size": 1, **kw})  # no blur: hand-computable


def test_region_gamma_by_hand():
    """Two regions on a 2x2 grid: region 1 = left column (foreground), region 2 = right column.
    ||delta|| is 1 on the left and 2 on the right; the foreground is the left column only:
    gamma_1 = 1/1 = 1, gamma_2 = 1/2 = 0.5 -> clamped to gamma_min 0.8."""
    delta = torch.zeros(1, 3, 2, 2)
    delta[0, 0, :, 0] = 1.0
    delta[0, 1, :, 1] = 2.0
    onehot = torch.zeros(1, 3, 2, 2)  # tokens 0, 1, 2
    onehot[0, 1, :, 0] = 1
    onehot[0, 2, :, 1] = 1
    fg = torch.zeros(1, 1, 2, 2)
    fg[0, 0, :, 0] = 1
    g = G.region_gamma(delta, onehot, fg, 2.0, _cfg(gamma_min=0.1))
    assert torch.allclose(g[0, 0], torch.tensor([[1.0, 0.5], [1.0, 0.5]]), atol=1e-6)
    g = G.region_gamma(delta, onehot, fg, 2.0, _cfg())
    assert torch.allclose(g[0, 0], torch.tensor([[1.0, 0.8], [1.0, 0.8]]), atol=1e-6)
    # foreground = the right column: gamma_1 = 2/1 = 2 on the left; w * gamma <= 15 caps it at 1.5
    g = G.region_gamma(delta, onehot, 1 - fg, 10.0, _cfg())
    assert torch.allclose(g[0, 0], torch.tensor([[1.5, 1.0], [1.5, 1.0]]), atol=1e-6)
    # masks at a lower resolution are upsampled (nearest) to the prediction's size
    g = G.region_gamma(delta.repeat_interleave(2, 2).repeat_interleave(2, 3), onehot, fg, 2.0, _cfg(gamma_min=0.1))
    assert g.shape == (1, 1, 4, 4) and torch.allclose(g[0, 0, :, :2], torch.ones(4, 2))


def test_guided_prediction_formula():
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    gamma = torch.rand(2, 1, 4, 4, generator=g) + 0.5
    out = G.guided_prediction(u, c, 2.5, gamma)
    assert torch.allclose(out, u + 2.5 * gamma * (c - u))
    assert torch.equal(G.guided_prediction(u, c, 2.5, torch.ones(2, 1, 4, 4)), u + 2.5 * (c - u))


def test_semantic_maps_regions_and_foreground_from_a_crafted_store():
    """Identity self-attention (no refinement effect) and a cross-attention that sends the left
    half to token 1, the right half to token 0 (the start token): regions follow the argmax of
    the spatially normalised maps, and the foreground is the left half."""
    store = G.AttentionStore(16)
    store.begin((4, 4), slice(None))
    cross = torch.full((1, 4, 4, 3), 0.05)
    cross[0, :, :2, 1] = 0.9
    cross[0, :, 2:, 0] = 0.9
    cross = cross / cross.sum(-1, keepdim=True)
    store.maps = {("cross", (4, 4)): [cross.reshape(1, 16, 3)], ("self", (4, 4)): [torch.eye(16)[None]]}
    out = G.semantic_maps(store, _cfg(), with_raw=True)
    assert out["tokens"].shape == (1, 3, 4, 4) and out["regions"].shape == (1, 4, 4)
    assert (out["regions"][0, :, :2] == 1).all() and (out["regions"][0, :, 2:] == 0).all()
    assert torch.equal(out["foreground"][0, 0], (torch.arange(4) < 2).float().expand(4, 4))
    assert torch.allclose(out["onehot"].sum(1), torch.ones(1, 4, 4))
    assert torch.allclose(out["raw"], out["tokens"])  # identity self-attention
    assert torch.allclose(out["tokens"].mean(dim=(2, 3)), torch.ones(1, 3), atol=1e-5)  # spatial-mean 1


def test_semantic_maps_without_records_says_what_is_wrong():
    store = G.AttentionStore(2)
    with pytest.raises(RuntimeError, match="max_side"):
        G.semantic_maps(store, G.SCFGConfig())


def test_config_checks_and_parsing():
    assert G.as_scfg_config(None) is None and G.as_scfg_config(False) is None
    assert G.as_scfg_config(True) == G.SCFGConfig()
    assert G.as_scfg_config({"gamma_max": 2.0}).gamma_max == 2.0
    with pytest.raises(ValueError, match="blur_size"):
        G.SCFGConfig(blur_size=2)
    with pytest.raises(ValueError, match="gamma_min"):
        G.SCFGConfig(gamma_min=3.5)
    with pytest.raises(TypeError, match="scfg"):
        G.as_scfg_config("yes")


# ------------------------------------------------------------------------------- S-CFG in generate


@pytest.mark.parametrize("which", ["pixel", "latent"])
def test_scfg_with_gamma_one_equals_plain_cfg_exactly(which, pixel_backbone, latent_backbone, adapter):
    bb = pixel_backbone if which == "pixel" else latent_backbone
    for ad in (None, adapter):
        plain = gen(bb, adapter=ad, num_images_per_prompt=2, seed=3)
        s = gen(bb, adapter=ad, num_images_per_prompt=2, seed=3, scfg=G.SCFGConfig(fixed_gamma=1.0))
        assert torch.equal(plain, s)


def test_scfg_changes_the_images_and_traces_every_step(pixel_backbone):
    trace = []
    plain = gen(pixel_backbone, num_images_per_prompt=2)
    s = gen(pixel_backbone, num_images_per_prompt=2, scfg=True, scfg_trace=trace)
    assert s.shape == plain.shape and not torch.equal(s, plain)
    assert len(trace) == STEPS
    L = pixel_backbone.max_length
    for t in trace:
        assert t["tokens"].shape == (4, L, 8, 8) and t["regions"].shape == (4, 8, 8)
        assert t["foreground"].shape == (4, 1, 8, 8) and t["gamma"].shape == (4, 8, 8)
        assert float(t["gamma"].min()) >= 0.8 - 1e-5 and float(t["gamma"].max()) <= 3.0 + 1e-5
    assert [t["timestep"] for t in trace] == sorted((t["timestep"] for t in trace), reverse=True)
    # the pipeline's UNet keeps its own processors afterwards
    assert not any(isinstance(p, G.RecordingProcessor) for p in pixel_backbone.unet.attn_processors.values())


def test_scfg_is_deterministic_and_per_image(pixel_backbone):
    a = gen(pixel_backbone, num_images_per_prompt=3, scfg=True, seed=5)
    b = gen(pixel_backbone, num_images_per_prompt=3, scfg=True, seed=5)
    assert torch.equal(a, b)
    one = gen(pixel_backbone, prompts=PROMPTS[:1], num_images_per_prompt=2, scfg=True, seed=5)
    assert torch.allclose(one, a[:2], atol=1e-5)  # the first images do not depend on how many


def test_scfg_needs_guidance(pixel_backbone):
    with pytest.raises(ValueError, match="guidance_scale > 1"):
        gen(pixel_backbone, scfg=True, guidance_scale=1.0)


def test_scfg_runs_on_a_tiny_sd15_shaped_unet(monkeypatch):
    """SD 1.5's UNet layout (4 levels, cross-attention in the first three and the middle, 8
    heads) with tiny widths, at a 64x64 latent (SD 1.5 at 512 px): S-CFG records the 16x16 and
    8x8 maps only and runs through the stock pipeline."""
    cfg = dict(sd15_configs()["unet"])
    cfg.update(block_out_channels=[32, 32, 64, 64], cross_attention_dim=32, norm_num_groups=32,
               layers_per_block=1)
    with seeded(0):
        unet = UNet2DConditionModel.from_config(cfg)
    base = M.tiny_random_backbone(text_dim=32, sample_size=64, with_vae=True, seed=0)
    base.unet = unet.eval().requires_grad_(False)
    seen = []
    orig = G.AttentionStore.record

    def spy(self, attn, h, *a):
        seen.append(self.grid(h.shape[1]))
        return orig(self, attn, h, *a)

    trace = []
    monkeypatch.setattr(G.AttentionStore, "record", spy)
    out = generate(base, PROMPTS[:1], num_inference_steps=1, guidance_scale=7.5, output_type="latent",
                   scfg=True, scfg_trace=trace)
    assert out.shape == (1, 4, 64, 64) and torch.isfinite(out).all()
    assert {(64, 64), (32, 32), (16, 16), (8, 8)} <= set(seen)  # every attention layer is seen ...
    assert trace[0]["tokens"].shape == (1, 77, 16, 16)  # ... the maps come from 16x16 and 8x8
    assert trace[0]["gamma"].shape == (1, 64, 64)


# ------------------------------------------------------------------------------- delayed conditioning


def test_schedule():
    assert G.conditioning_schedule(10, 0.3) == [False] * 3 + [True] * 7
    assert G.conditioning_schedule(10, 0.3, "adapted_first") == [True] * 3 + [False] * 7
    assert G.conditioning_schedule(4, 0.0) == [True] * 4 and G.conditioning_schedule(4, 1.0) == [False] * 4
    assert G.conditioning_schedule(25, 0.5).count(False) == 13  # floor(12.5 + 0.5)
    with pytest.raises(ValueError, match="alpha"):
        G.conditioning_schedule(4, 1.5)
    with pytest.raises(ValueError, match="order"):
        G.conditioning_schedule(4, 0.5, "sideways")


@pytest.mark.parametrize("scfg", [None, True])
def test_alpha_0_and_1_equal_the_adapted_and_the_plain_conditioning(pixel_backbone, adapter, scfg):
    adapted = gen(pixel_backbone, adapter=adapter, num_images_per_prompt=2, scfg=scfg)
    plain = gen(pixel_backbone, num_images_per_prompt=2, scfg=scfg)
    assert not torch.equal(adapted, plain)
    for order, a_for_adapted in (("plain_first", 0.0), ("adapted_first", 1.0)):
        got = gen(pixel_backbone, adapter=adapter, num_images_per_prompt=2, scfg=scfg,
                  delay_alpha=a_for_adapted, delay_order=order)
        assert torch.equal(got, adapted)
        got = gen(pixel_backbone, adapter=adapter, num_images_per_prompt=2, scfg=scfg,
                  delay_alpha=1.0 - a_for_adapted, delay_order=order)
        assert torch.equal(got, plain)


@pytest.mark.parametrize("scfg", [None, True])
@pytest.mark.parametrize("order", ["plain_first", "adapted_first"])
def test_the_unet_sees_the_scheduled_embedding_at_each_step(pixel_backbone, adapter, monkeypatch, scfg, order):
    steps, n = 5, 2
    plain, uncond = prompt_embeddings(pixel_backbone, PROMPTS, None)
    adapted, _ = prompt_embeddings(pixel_backbone, PROMPTS, adapter)
    seen = []
    forward = type(pixel_backbone.unet).forward

    def spy(self, sample, t, encoder_hidden_states, *a, **kw):
        seen.append(encoder_hidden_states.detach().clone())
        return forward(self, sample, t, encoder_hidden_states, *a, **kw)

    monkeypatch.setattr(type(pixel_backbone.unet), "forward", spy)
    gen(pixel_backbone, adapter=adapter, num_inference_steps=steps, num_images_per_prompt=n,
        delay_alpha=0.4, delay_order=order, scfg=scfg)
    schedule = G.conditioning_schedule(steps, 0.4, order)
    assert len(seen) == steps
    for ctx, use_adapted in zip(seen, schedule):
        un, co = ctx.chunk(2)  # [uncond; cond] in both cases (pipeline CFG or the S-CFG wrapper)
        want = (adapted if use_adapted else plain).repeat_interleave(n, 0)
        assert torch.equal(co, want)
        assert torch.equal(un, uncond.repeat_interleave(n, 0))  # the unconditional branch never changes


def test_delay_needs_an_adapter(pixel_backbone):
    with pytest.raises(ValueError, match="adapter"):
        gen(pixel_backbone, delay_alpha=0.5)


def test_defaults_leave_generate_unchanged(pixel_backbone, adapter):
    pipe = make_pipeline(pixel_backbone)
    a = gen(pixel_backbone, adapter=adapter, pipe=pipe)
    b = gen(pixel_backbone, adapter=adapter, pipe=pipe, scfg=None, delay_alpha=None)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------- compose experiment


def test_compose_plan_pairs_every_condition_with_plain_cfg_at_its_scale():
    from sur_lib.study.experiments.compose import plan

    conds = plan((2.0, 3.0), (0.3,), (2.0,))
    names = [c["name"] for c in conds]
    assert len(names) == len(set(names))
    for c in conds:
        if c["reference"] is not None:
            ref = next(r for r in conds if r["name"] == c["reference"])
            assert ref["method"] == "cfg" and ref["delay_alpha"] is None
            assert (ref["model"], ref["text"], ref["scale"]) == (c["model"], c["text"], c["scale"])
            assert names.index(ref["name"]) < names.index(c["name"])
    assert "adapter/delay-plain_first@0.3/cfg@2" in names and "complex/scfg@2" in names


@pytest.mark.slow
def test_compose_quick_run_and_verify(tmp_path, capsys):
    """The quick compose experiment on the shipped base model and adapter; verify re-runs part
    of it and agrees; a tampered record makes verify fail."""
    from sur_lib.study import experiments as ex
    from sur_lib.world.paths import TINY_MODEL_DIR

    if not (TINY_MODEL_DIR / "sur_backbone.json").is_file() or not (ex.ADAPTER_DIR / "config.json").is_file():
        pytest.skip("needs data/models/tiny-sur-world and data/models/sur-adapter-tiny")
    model = tmp_path / "model"
    shutil.copytree(TINY_MODEL_DIR, model)
    argv = ["--quick", "--no-progress", "--no-cache", "--model-dir", str(model)]
    assert ex.main(["compose", *argv, "--no-overhead", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "compose-quick.json").read_text())
    assert doc["experiment"] == "compose" and doc["quick"] and doc["seed"] == 0
    for name, c in doc["conditions"].items():
        assert ex.same_numbers(ex.summarize(c["records"]), c["summary"])
        if c["reference"]:
            ref = doc["conditions"][c["reference"]]["records"]
            assert ex.same_numbers(ex.compare(ref, c["records"]), c["vs_reference"])
    assert {r["condition"] for r in doc["table"]} == set(doc["conditions"])
    shutil.copy(tmp_path / "compose-quick.json", tmp_path / "compose.json")
    assert ex.main(["verify", *argv, "--only", "compose", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "OK   compose" in out
    lines = [ln for ln in out.splitlines() if "image-for-image agreement" in ln]
    assert len(lines) == len(doc["verify"]["conditions"]) >= 3
    for ln in lines:  # same machine, same seeds: the very same verdicts
        k, n = re.search(r"image-for-image agreement (\d+)/(\d+)", ln).groups()
        assert k == n, ln


def test_composed_records_are_cached_by_their_guidance_options(pixel_backbone, tmp_path):
    """images.evaluate_condition with guidance options: a second call reads every record back,
    other options miss the cache, and the records without options keep their own keys."""
    from sur_lib.study.experiments.common import GenSettings
    from sur_lib.study.experiments.images import evaluate_condition

    spec = {"id": "counting-00", "type": "counting", "count": 2, "color": "red",
            "shape": "circle", "arrangement": None, "noun": "cherry"}
    g = GenSettings(steps=2)
    run = lambda guidance, hits: evaluate_condition(  # noqa: E731
        pixel_backbone, [spec], ["two cherries"], 1, 0, g, cache=tmp_path, progress=False,
        guidance=guidance, hits=hits)
    first, again, other, plain = [], [], [], []
    a = run({"scfg": True}, first)
    b = run({"scfg": True}, again)
    run({"scfg": G.SCFGConfig(gamma_max=2.0)}, other)
    run(None, plain)
    assert first == [] and again == ["counting-00"] and other == [] and plain == []
    assert a == b
    assert len(list((tmp_path / "compose").rglob("*.json"))) == 2
