"""Generation through the stock StableDiffusionPipeline, with and without a SUR-adapter."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from sur_lib import models as M
from sur_lib.pipeline import generate, make_pipeline, prompt_embeddings

try:
    from sur_lib.adapter import SURAdapter
except ImportError:  # pragma: no cover - the adapter lands in its own change
    SURAdapter = None

STEPS = 2
PROMPTS = ["four tomatoes", "a blue glass with red juice"]


def adapter(eta):
    if SURAdapter is None:
        pytest.skip("sur_lib.adapter is not there yet")
    return SURAdapter(text_dim=32, num_layers=1, num_heads=2, ffn_dim=64, eta=eta, llm_dim=None)


@pytest.fixture(scope="module")
def latent_backbone():
    return M.tiny_random_backbone(text_dim=32, sample_size=8, with_vae=True, seed=0)


@pytest.fixture(scope="module")
def pixel_backbone():
    return M.tiny_random_backbone(text_dim=32, sample_size=8, with_vae=False, seed=0)


@pytest.fixture
def spy(monkeypatch):
    """Records the keyword arguments of every StableDiffusionPipeline call."""
    calls = []
    original = StableDiffusionPipeline.__call__

    def recording_call(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", recording_call)
    return calls


def gen(backbone, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("output_type", "pt")
    return generate(backbone, kw.pop("prompts", PROMPTS), **kw)


def test_make_pipeline_is_stock(latent_backbone):
    pipe = make_pipeline(latent_backbone)
    assert type(pipe) is StableDiffusionPipeline and pipe.safety_checker is None
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert torch.equal(pipe.scheduler.betas, latent_backbone.scheduler.betas)
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.set_alpha_to_one is False
    assert pipe.unet is latent_backbone.unet and pipe.vae is latent_backbone.vae
    trailing = make_pipeline(latent_backbone, scheduler_kwargs={"timestep_spacing": "trailing"})
    assert trailing.scheduler.config.timestep_spacing == "trailing"
    with pytest.raises(ValueError):
        make_pipeline(latent_backbone, scheduler="nope")


def test_seed_reproducibility(latent_backbone):
    a = gen(latent_backbone, seed=0)
    b = gen(latent_backbone, seed=0)
    c = gen(latent_backbone, seed=1)
    assert a.shape == (2, 3, 16, 16) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)


def test_output_types(latent_backbone):
    pil = gen(latent_backbone, output_type="pil", num_images_per_prompt=2)
    assert len(pil) == 4 and all(isinstance(im, Image.Image) and im.size == (16, 16) for im in pil)
    arr = gen(latent_backbone, output_type="np")
    assert isinstance(arr, np.ndarray) and arr.shape == (2, 16, 16, 3)
    pt = gen(latent_backbone)
    assert np.allclose(arr, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    with pytest.raises(ValueError):
        gen(latent_backbone, output_type="jpeg")


def test_pipeline_receives_the_encoded_prompts(latent_backbone, spy):
    gen(latent_backbone, negative_prompt="blurry")
    (call,) = spy
    assert torch.equal(call["prompt_embeds"], latent_backbone.encode_prompts(PROMPTS))
    assert torch.equal(call["negative_prompt_embeds"], latent_backbone.encode_prompts(["blurry"] * 2))
    assert "prompt" not in call and call["guidance_scale"] == 7.5
    assert isinstance(call["generator"], torch.Generator)


def test_negative_prompt_matters(latent_backbone):
    assert not torch.allclose(gen(latent_backbone), gen(latent_backbone, negative_prompt="blurry"), atol=1e-3)


def test_identity_adapter_gives_identical_images(latent_backbone):
    base = gen(latent_backbone)
    assert torch.equal(gen(latent_backbone, adapter=adapter(0.0)), base)
    # untrained paper-mode adapter: c = (1 - eta) x, which changes the images
    assert not torch.allclose(gen(latent_backbone, adapter=adapter(0.5)), base, atol=1e-3)


def test_adapt_unconditional(latent_backbone, spy):
    ad = adapter(0.5).train()  # generate must switch it to eval
    cond = latent_backbone.encode_prompts(PROMPTS)
    uncond = latent_backbone.encode_prompts(["", ""])
    gen(latent_backbone, adapter=ad)
    gen(latent_backbone, adapter=ad, adapt_unconditional=True)
    assert not ad.training
    default, authors = spy
    for call in (default, authors):  # untrained paper-mode adapter: c = (1 - eta) x exactly
        assert torch.allclose(call["prompt_embeds"], 0.5 * cond, atol=1e-6)
    assert torch.equal(default["negative_prompt_embeds"], uncond)
    assert torch.allclose(authors["negative_prompt_embeds"], 0.5 * uncond, atol=1e-6)


def test_adapt_unconditional_is_one_adapter_call(latent_backbone):
    """The authors' pipeline adapts [uncond; cond] in one batch (so their adapter mixes them)."""
    ad = adapter(0.5)
    batches = []
    ad.register_forward_hook(lambda mod, inp, out: batches.append(inp[0].shape[0]))
    prompt_embeddings(latent_backbone, PROMPTS, ad)
    prompt_embeddings(latent_backbone, PROMPTS, ad, adapt_unconditional=True)
    assert batches == [2, 4]


def test_pixel_space_generates_images_of_unet_size(pixel_backbone, spy):
    pt = gen(pixel_backbone)
    assert pt.shape == (2, 3, 8, 8) and pt.min() >= 0 and pt.max() <= 1
    assert spy[0]["output_type"] == "latent"
    pil = gen(pixel_backbone, output_type="pil", num_images_per_prompt=3)
    assert len(pil) == 6 and all(im.size == (8, 8) for im in pil)
    assert gen(pixel_backbone, output_type="np").shape == (2, 8, 8, 3)
    assert gen(pixel_backbone, height=16, width=24).shape == (2, 3, 16, 24)
    latents = gen(pixel_backbone, output_type="latent")
    assert torch.allclose((latents / 2 + 0.5).clamp(0, 1), pt, atol=1e-6)  # [-1, 1] -> [0, 1]
    assert torch.equal(gen(pixel_backbone, seed=3), gen(pixel_backbone, seed=3))
    assert torch.equal(gen(pixel_backbone, adapter=adapter(0.0)), pt)


def test_no_guidance_runs(pixel_backbone):
    out = gen(pixel_backbone, guidance_scale=1.0)
    assert out.shape == (2, 3, 8, 8) and not torch.allclose(out, gen(pixel_backbone), atol=1e-3)


def test_tiny_world_sampler_clips_x0_inside_the_stock_pipeline():
    """The pretrain scheduler's x0 clipping must survive StableDiffusionPipeline, which resets
    clip_sample to False: a wild noise prediction still gives pred_original_sample in [-1, 1]."""
    from sur_lib.models import tiny_random_backbone
    from sur_lib.pipeline import make_pipeline
    from sur_lib.world.pretrain import build_scheduler

    bb = tiny_random_backbone(with_vae=False, seed=0)
    bb.scheduler = build_scheduler()
    for name in ("ddim", "ddpm"):
        sched = make_pipeline(bb, name).scheduler
        sched.set_timesteps(25)
        t = sched.timesteps[0]
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        x0 = sched.step(50 * torch.randn_like(x), t, x).pred_original_sample
        assert x0.abs().max() <= 1.0 + 1e-6, name
