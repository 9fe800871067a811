"""Guidance that composes with the SUR-adapter: S-CFG and delayed conditioning.

Both work on any diffusers ``UNet2DConditionModel`` (the SUR world's pixel-space UNet and
SD 1.5's alike) and leave generation to the stock ``StableDiffusionPipeline``; no pipeline code
is copied. ``pipeline.generate(..., scfg=..., delay_alpha=...)`` switches them on.

S-CFG (semantic-aware classifier-free guidance; Shen et al., CVPR 2024)
-----------------------------------------------------------------------
Plain CFG uses one scale everywhere: eps = eps_u + w (eps_c - eps_u). The norm of the guidance
term eps_c - eps_u differs a lot between semantic regions, so one scale over-amplifies some and
under-amplifies others. S-CFG, at every denoising step,

1. records the conditional branch's attention probabilities, heads averaged: cross-attention
   A (pixels x tokens) and self-attention S (pixels x pixels), at the low resolutions
   (``SCFGConfig.max_side``: maps of side <= 16, i.e. 16x16 and 8x8 for SD 1.5 at 512 px and
   for the SUR world's 32 px UNet, where these are all its attention layers);
2. refines each layer's cross-attention by its self-attention, A' = P A with the power series
   P = (S + S^2 + ... + S^K) / K (``refine_terms`` K = 4), so that a token's map spreads over
   its whole object; upsamples every map to the largest recorded side (bilinear), blurs it
   (3x3 Gaussian, sigma 0.5, reflect padding), divides each token's map by its spatial mean
   and averages over layers (``semantic_maps``);
3. cuts the image into regions: each pixel belongs to the token with the largest map; the
   foreground is where the summed maps of tokens 1.. exceed the map of token 0 (the start
   token, [CLS] for MiniLM), each of the two normalised by its spatial mean;
4. with n(p) = ||eps_c(p) - eps_u(p)|| over channels, gives region k the scale
   gamma_k = mean of n over the foreground / mean of n over region k, clamps gamma to
   [0.8, 3] and to w gamma <= 15, and blurs the gamma map (``region_gamma``);
5. predicts eps = eps_u + w gamma(p) (eps_c - eps_u) (``guided_prediction``).

Deviations from the official code (SmilesDZgk/S-CFG), all stated: (a) its power series loop
computes S + 3 S^2 (it squares S each time instead of multiplying the running power); we use
the series it names, S + S^2 + S^3 + S^4; (b) ties in the argmax give one region (argmax),
not several; (c) it reads the foreground from the batch's first (unconditional) half; we read
it from the conditional branch, where the prompt's tokens are.

How it hooks in: ``RecordingProcessor`` wraps each attention layer's own processor; the
layer's output is computed by that processor unchanged, and the probabilities are computed on
the side (one extra q/k product per recorded layer). ``SCFGUNet`` wraps the UNet: it runs
[uncond; cond] in one batch exactly as the pipeline would, and does the guidance itself; the
pipeline runs with ``guidance_scale=1`` (its own CFG off). With gamma fixed to 1 the result
is therefore bit-identical to plain CFG (a test checks it).

Delayed conditioning (FastComposer; Xiao et al., 2023)
------------------------------------------------------
FastComposer gives the conditional branch the plain text embedding for the first steps and its
subject-augmented embedding afterwards, so that the augmented one does not take over the
layout. The SUR analogue: a schedule between the plain simple-prompt embedding and the adapted
one. ``delay_alpha`` is the fraction of steps that get the *first* embedding of
``order``: "plain_first" (plain text for the first round(alpha N) steps, adapted after: alpha = 0
is the adapter, alpha = 1 the base model) or "adapted_first" (adapted for the first
round(alpha N) steps, plain after). FastComposer's own alpha counts the other way (augmented
from step (1 - alpha) N on, default 0.7, i.e. 30% text-only); ours is the fraction of plain
steps, 0.3 for their default. The swap goes through the pipeline's ``callback_on_step_end``,
which may return new ``prompt_embeds``; the unconditional branch is never changed.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .infra.guidance_checks import check_schedule, check_scfg


# =============================================================================== settings


@dataclass(frozen=True)
class SCFGConfig:
    """S-CFG's settings (defaults: the official code's).

    max_side: record attention maps whose side is at most this (16: 16x16 and 8x8).
    refine_terms: K of the self-attention power series (S + ... + S^K) / K.
    blur_size, blur_sigma: the Gaussian blur of the token maps and of the gamma map.
    gamma_min, gamma_max: clamps of gamma; max_scale: clamp of w * gamma.
    fixed_gamma: use this constant instead of the per-region gamma (1.0 is plain CFG computed
    by the S-CFG path, maps still recorded: for tests and for timing the recording alone).
    """

    max_side: int = 16
    refine_terms: int = 4
    blur_size: int = 3
    blur_sigma: float = 0.5
    gamma_min: float = 0.8
    gamma_max: float = 3.0
    max_scale: float = 15.0
    fixed_gamma: float | None = None

    def __post_init__(self):
        check_scfg(self)  # sur_lib.infra.guidance_checks: errors name the setting

    def to_dict(self) -> dict:
        return asdict(self)


def as_scfg_config(scfg) -> SCFGConfig | None:
    """``generate``'s ``scfg`` argument: None/False (off), True (defaults), a dict or a config."""
    if scfg is None or scfg is False:
        return None
    if scfg is True:
        return SCFGConfig()
    if isinstance(scfg, dict):
        return SCFGConfig(**scfg)
    if isinstance(scfg, SCFGConfig):
        return scfg
    raise TypeError(f"scfg must be None, a bool, a dict or an SCFGConfig, got {type(scfg).__name__}")


# =============================================================================== recording


class AttentionStore:
    """Head-averaged attention probabilities of the conditional branch, for one UNet call.

    ``maps[(kind, (h, w))]`` is a list (in layer order) of tensors [B, h*w, keys], kind
    "cross" (keys = tokens) or "self" (keys = pixels); every row sums to one over the keys.
    """

    def __init__(self, max_side: int = 16):
        self.max_side = int(max_side)
        self.active = False
        self.cond = slice(None)  # which samples of the UNet batch are the conditional branch
        self.latent_hw: tuple[int, int] | None = None
        self.maps: dict[tuple[str, tuple[int, int]], list[torch.Tensor]] = {}

    def begin(self, latent_hw: tuple[int, int], cond: slice):
        self.maps, self.latent_hw, self.cond, self.active = {}, tuple(latent_hw), cond, True

    def end(self):
        self.active = False

    def grid(self, n_pixels: int) -> tuple[int, int] | None:
        """(h, w) of a layer with ``n_pixels`` queries, from the latent size (None if not a grid)."""
        H, W = self.latent_hw
        f = math.sqrt(H * W / n_pixels)
        h, w = round(H / f), round(W / f)
        return (h, w) if h * w == n_pixels else None

    def grids(self) -> list[tuple[int, int]]:
        """The recorded (h, w), largest first."""
        return sorted({hw for _, hw in self.maps}, key=lambda hw: hw[0] * hw[1], reverse=True)

    def record(self, attn, hidden_states, encoder_hidden_states, attention_mask):
        if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None:
            return  # not a transformer block's attention (e.g. a VAE mid-block)
        hw = self.grid(hidden_states.shape[1])
        if hw is None or max(hw) > self.max_side:
            return
        if attention_mask is not None:
            raise NotImplementedError("S-CFG's recording does not support attention masks")
        kind = "self" if encoder_hidden_states is None else "cross"
        x = hidden_states[self.cond]
        ctx = x if encoder_hidden_states is None else encoder_hidden_states[self.cond]
        if kind == "cross" and attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        q, k = attn.to_q(x), attn.to_k(ctx)
        b, heads = q.shape[0], attn.heads
        q = q.view(b, q.shape[1], heads, -1).transpose(1, 2)
        k = k.view(b, k.shape[1], heads, -1).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        scores = (q.float() @ k.float().transpose(-1, -2)) * attn.scale
        probs = scores.softmax(dim=-1).mean(dim=1)  # heads averaged: [B, pixels, keys]
        self.maps.setdefault((kind, hw), []).append(probs)


class RecordingProcessor:
    """Wraps an attention layer's processor: the output is the wrapped processor's, unchanged;
    while the store is active, the conditional branch's probabilities are recorded too."""

    def __init__(self, store: AttentionStore, inner):
        self.store, self.inner = store, inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        if self.store.active:
            self.store.record(attn, hidden_states, encoder_hidden_states, attention_mask)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


@contextmanager
def recording(unet, store: AttentionStore):
    """Install ``RecordingProcessor``s on every attention layer of ``unet``; restore after."""
    original = dict(unet.attn_processors)
    unet.set_attn_processor({name: RecordingProcessor(store, proc) for name, proc in original.items()})
    try:
        yield store
    finally:
        unet.set_attn_processor(original)


# =============================================================================== maps -> regions


def gaussian_blur(x: torch.Tensor, size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """Blur every channel of [B, C, H, W] with a normalised size x size Gaussian (reflect pad)."""
    if size == 1:
        return x
    r = torch.arange(size, dtype=torch.float32, device=x.device) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).to(x.dtype)
    c = x.shape[1]
    pad = size // 2
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect") if min(x.shape[-2:]) > pad else \
        F.pad(x, (pad, pad, pad, pad), mode="replicate")
    return F.conv2d(xp, kernel.expand(c, 1, size, size).contiguous(), groups=c)


def refine_cross(cross: torch.Tensor, self_: torch.Tensor, terms: int = 4) -> torch.Tensor:
    """A' = P A with P = (S + S^2 + ... + S^terms) / terms; A [B, N, L], S [B, N, N].
    Computed as repeated products S (S (... A)) (terms products of N x N by N x L instead of
    N x N powers). Rows of S sum to one, so rows of P and of A' do too."""
    v, acc = cross, torch.zeros_like(cross)
    for _ in range(terms):
        v = self_ @ v
        acc = acc + v
    return acc / terms


def _spatial_normalise(m: torch.Tensor) -> torch.Tensor:
    return m / (m.mean(dim=(2, 3), keepdim=True) + 1e-8)


def semantic_maps(store: AttentionStore, cfg: SCFGConfig, with_raw: bool = False) -> dict:
    """Steps 2-3 above from one UNet call's recorded maps.

    Returns "tokens" [B, L, s, s] (refined, blurred, normalised by spatial mean, averaged over
    layers; s = the largest recorded side), "regions" [B, s, s] (token index per pixel),
    "onehot" [B, L, s, s], "foreground" [B, 1, s, s] (0/1) and, with ``with_raw``, "raw" (the
    same aggregation without the self-attention refinement, to show what refinement does).
    Cross- and self-attention maps of the same grid are paired in layer order (a transformer
    block's self-attention comes before its cross-attention).
    """
    grids = [g for g in store.grids() if store.maps.get(("cross", g)) and store.maps.get(("self", g))]
    if not grids:
        raise RuntimeError("S-CFG recorded no attention maps: no cross- and self-attention layer "
                           f"with a side <= {store.max_side} (SCFGConfig.max_side)")
    h_top, w_top = grids[0]
    tokens = fore = raw = 0.0
    n_layers = 0
    for hw in grids:
        crosses, selves = store.maps[("cross", hw)], store.maps[("self", hw)]
        if len(crosses) != len(selves):
            raise RuntimeError(f"at {hw}: {len(crosses)} cross- but {len(selves)} self-attention maps")
        for a, sa in zip(crosses, selves):
            b, n, L = a.shape
            variants = [("tok", refine_cross(a, sa, cfg.refine_terms))]
            if with_raw:
                variants.append(("raw", a))
            for name, m in variants:
                m = m.transpose(1, 2).reshape(b, L, *hw)
                if hw != (h_top, w_top):
                    m = F.interpolate(m, size=(h_top, w_top), mode="bilinear", align_corners=False)
                m = gaussian_blur(m, cfg.blur_size, cfg.blur_sigma)
                if name == "raw":
                    raw = raw + _spatial_normalise(m)
                    continue
                tokens = tokens + _spatial_normalise(m)
                fg = torch.stack([m[:, 0], m[:, 1:].sum(dim=1)], dim=1)
                fore = fore + _spatial_normalise(fg)
            n_layers += 1
    tokens, fore = tokens / n_layers, fore / n_layers
    regions = tokens.argmax(dim=1)
    onehot = F.one_hot(regions, tokens.shape[1]).permute(0, 3, 1, 2).to(tokens.dtype)
    foreground = (fore[:, 1:2] > fore[:, 0:1]).to(tokens.dtype)
    out = {"tokens": tokens, "regions": regions, "onehot": onehot, "foreground": foreground}
    if with_raw:
        out["raw"] = raw / n_layers
    return out


# =============================================================================== gamma, guidance


def region_gamma(delta: torch.Tensor, onehot: torch.Tensor, foreground: torch.Tensor,
                 guidance_scale: float, cfg: SCFGConfig) -> torch.Tensor:
    """Step 4: the per-pixel scale gamma [B, 1, H, W] for the guidance term ``delta`` =
    eps_c - eps_u [B, C, H, W], from region masks [B, L, s, s] and the foreground [B, 1, s, s]
    (upsampled to H x W, nearest). gamma_k = mean_fg(n) / mean_k(n) with n = ||delta|| over
    channels; gamma(p) = gamma of p's region; clamped to [gamma_min, gamma_max] and to
    w gamma <= max_scale; then blurred."""
    H, W = delta.shape[-2:]
    masks = F.interpolate(onehot.float(), size=(H, W), mode="nearest")
    fg = F.interpolate(foreground.float(), size=(H, W), mode="nearest")
    n = delta.float().norm(dim=1, keepdim=True)  # [B, 1, H, W]
    region_norm = (n * masks).sum(dim=(2, 3)) / (masks.sum(dim=(2, 3)) + 1e-8)  # [B, L]
    fore_norm = (n * fg).sum(dim=(2, 3)) / (fg.sum(dim=(2, 3)) + 1e-8)  # [B, 1]
    present = (masks.sum(dim=(2, 3)) > 0).float()
    rate = fore_norm * present / (region_norm + 1e-8)  # [B, L]
    gamma = (rate[:, :, None, None] * masks).sum(dim=1, keepdim=True)
    gamma = gamma.clamp(cfg.gamma_min, cfg.gamma_max).clamp_max(cfg.max_scale / guidance_scale)
    return gaussian_blur(gamma, cfg.blur_size, cfg.blur_sigma).to(delta.dtype)


def guided_prediction(eps_u: torch.Tensor, eps_c: torch.Tensor, guidance_scale: float,
                      gamma: torch.Tensor) -> torch.Tensor:
    """Step 5: eps = eps_u + w gamma(p) (eps_c - eps_u); gamma [B, 1, H, W] (or broadcastable)."""
    return eps_u + (guidance_scale * gamma) * (eps_c - eps_u)


class SCFGUNet(torch.nn.Module):
    """A UNet wrapper that does S-CFG itself (the pipeline runs with its own CFG off).

    Use it through ``run`` (which installs the recording processors). Called with the
    conditional batch only, it runs the UNet on [uncond; cond] (the same batch
    and order as the pipeline's CFG), records the conditional branch's attention, and returns
    the S-CFG prediction. ``uncond``: the unconditional embeddings, one per sample of the batch
    the pipeline sends (already repeated per image). ``trace``: a list to which every step
    appends its maps, regions, foreground and gamma (CPU tensors), for figures.
    """

    def __init__(self, unet, uncond: torch.Tensor, guidance_scale: float, cfg: SCFGConfig,
                 trace: list | None = None):
        super().__init__()
        self.unet, self.uncond, self.w, self.scfg, self.trace = unet, uncond, float(guidance_scale), cfg, trace
        self.store = AttentionStore(cfg.max_side)

    def run(self, pipe, **kwargs):
        """``pipe(**kwargs)`` with the recording processors installed on the UNet for the whole
        call (and removed after); ``pipe`` is a pipeline whose unet is this wrapper, called with
        ``guidance_scale=1``."""
        with recording(self.unet, self.store):
            return pipe(**kwargs)

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def device(self):
        return self.unet.device

    def forward(self, sample, timestep, encoder_hidden_states, *args, return_dict: bool = True, **kwargs):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        b = sample.shape[0]
        if self.uncond.shape[0] != b or encoder_hidden_states.shape[0] != b:
            raise ValueError(f"S-CFG: batch of {b} latents, {encoder_hidden_states.shape[0]} conditional "
                             f"and {self.uncond.shape[0]} unconditional embeddings")
        x = torch.cat([sample] * 2)
        ctx = torch.cat([self.uncond.to(encoder_hidden_states), encoder_hidden_states])
        self.store.begin(sample.shape[-2:], slice(b, 2 * b))
        try:
            out = self.unet(x, timestep, ctx, *args, return_dict=False, **kwargs)[0]
        finally:
            self.store.end()
        eps_u, eps_c = out.chunk(2)
        want_maps = self.scfg.fixed_gamma is None or self.trace is not None
        maps = semantic_maps(self.store, self.scfg, with_raw=self.trace is not None) if want_maps else None
        if self.scfg.fixed_gamma is not None:
            gamma = torch.full((b, 1, *sample.shape[-2:]), float(self.scfg.fixed_gamma),
                               dtype=eps_c.dtype, device=eps_c.device)
        else:
            gamma = region_gamma(eps_c - eps_u, maps["onehot"], maps["foreground"], self.w, self.scfg)
        self.store.maps = {}
        if self.trace is not None:
            self.trace.append({"timestep": int(timestep.item() if torch.is_tensor(timestep) else timestep),
                               **{k: maps[k].detach().cpu() for k in ("tokens", "raw", "regions", "foreground")},
                               "gamma": gamma[:, 0].detach().float().cpu(),
                               "delta_norm": (eps_c - eps_u).float().norm(dim=1).detach().cpu()})
        eps = guided_prediction(eps_u, eps_c, self.w, gamma)
        return UNet2DConditionOutput(sample=eps) if return_dict else (eps,)


# =============================================================================== delayed conditioning


def conditioning_schedule(num_steps: int, alpha: float, order: str = "plain_first") -> list[bool]:
    """Per denoising step: True where the conditional branch gets the adapted embedding.
    "plain_first": the first floor(alpha N + 0.5) steps plain, the rest adapted;
    "adapted_first": the first floor(alpha N + 0.5) steps adapted, the rest plain."""
    check_schedule(num_steps, alpha, order)
    k = int(math.floor(float(alpha) * num_steps + 0.5))
    if order == "plain_first":
        return [i >= k for i in range(num_steps)]
    return [i < k for i in range(num_steps)]


class ConditioningSwap:
    """``callback_on_step_end`` that gives step i + 1 the embedding the schedule asks for.

    plain, adapted: conditional embeddings [B, L, D] (one per prompt); the pipeline repeats
    them per image, so the swap does too. With the pipeline's own CFG on, ``prompt_embeds`` is
    [uncond; cond] and only the cond half is replaced; with it off (S-CFG) it is cond only.
    """

    tensor_inputs = ["prompt_embeds"]

    def __init__(self, plain: torch.Tensor, adapted: torch.Tensor, schedule: list[bool],
                 num_images_per_prompt: int = 1):
        n = int(num_images_per_prompt)
        self.embeds = {False: plain.repeat_interleave(n, dim=0), True: adapted.repeat_interleave(n, dim=0)}
        self.schedule = list(schedule)

    def initial(self) -> bool:
        return self.schedule[0]

    def __call__(self, pipe, i: int, t, callback_kwargs: dict) -> dict:
        nxt = i + 1
        if nxt >= len(self.schedule):
            return {}
        if self.schedule[nxt] == self.schedule[i]:
            return {}
        pe = callback_kwargs["prompt_embeds"]
        want = self.embeds[self.schedule[nxt]].to(pe)
        if pipe.do_classifier_free_guidance:
            pe = torch.cat([pe[: pe.shape[0] - want.shape[0]], want])
        else:
            pe = want
        return {"prompt_embeds": pe}
