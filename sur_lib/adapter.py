"""The SUR-adapter (paper Sec. 3.4, Eq. 4-7).

Given the text encoder's token states ``x = fEn(ps)`` of a simple prompt ([B, N, D]):

    h0 = Encoder(x)                       a small transformer encoder (2 layers in the paper)
    Q  = h3[x] = Wq h0                    Eq. 4   (the query side also feeds L_LLM, Eq. 5)
    K  = h2[x] = Wk x,   V = x
    V' = softmax(Q K^T / sqrt(D)) V       Eq. 6   (single head, over the N tokens)
    out = g(V + V' + h1[V + V'])          h1 = 2-layer MLP, g = Linear, zero-initialised
    c  = eta * out + (1 - eta) * x        Eq. 7   (eta = 0.1 in the authors' run)

Two variants share this code:

* the paper-faithful default: the encoder attends across tokens (``batch_first=True``), g is
  fully zero (weight and bias), so an untrained adapter returns exactly ``(1 - eta) * x``;
  no unused modules; L_LLM is applied to Q as Eq. 5 writes.
* ``official=True`` reproduces the authors' ``SUR_adapter.py``: ``nn.TransformerEncoder`` with
  ``batch_first=False`` on [B, N, D] inputs (so it attends across the *batch*, not the tokens),
  g with a zero weight but nn.Linear's random bias (an untrained adapter is
  ``(1 - eta) x + eta * bias``), the unused template encoder layer and value projection are kept
  (~20.1M stored, ~14.0M used at SD 1.5 width; the unused ones are frozen, so training on
  several GPUs with DistributedDataParallel needs no ``find_unused_parameters``), and L_LLM is applied to h0. Module names follow
  the authors' code, so their ``adapter.pt`` state dict loads with ``load_authors_state_dict``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from .infra import adapter_files

G_INITS = ("zeros", "kaiming_normal", "normal", "uniform")


class KnowledgeProjection(nn.Module):
    """The fixed random matrix W0 of Eq. 5, mapping an LLM vector (llm_dim) to text width.

    The paper calls W0 "fixed random Kaiming"; the authors' code uses an ``nn.Linear`` with
    default init that is never seeded and never saved, so their W0 changes from run to run.
    Here W0 is drawn from a seeded generator (Kaiming-uniform, the same law as ``nn.Linear``'s
    default weight), has no bias, is stored as a persistent buffer (saved with the adapter)
    and never trained.
    """

    def __init__(self, llm_dim: int, text_dim: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(int(seed))
        bound = 1.0 / math.sqrt(llm_dim)  # kaiming_uniform_(a=sqrt(5)) as nn.Linear does
        weight = (torch.rand(text_dim, llm_dim, generator=gen) * 2 - 1) * bound
        self.register_buffer("weight", weight, persistent=True)

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        """[..., llm_dim] -> [..., text_dim]."""
        if k.shape[-1] != self.weight.shape[1]:
            raise ValueError(
                f"knowledge vectors have width {k.shape[-1]}, but W0 expects {self.weight.shape[1]} "
                "(the LLM's hidden size the adapter was built with: SURAdapter(llm_dim=...))"
            )
        return k.to(self.weight.dtype) @ self.weight.T


@dataclass
class SURAdapterOutput(BaseOutput):
    """What ``SURAdapter.forward`` returns.

    c:       the mixed conditioning of Eq. 7, [B, N, D]: goes to the UNet and into L_CP (Eq. 9)
    h0:      the transformer encoder's output, [B, N, D]
    q:       the attention queries Q = Wq h0 (Eq. 4), [B, N, D]
    student: the tensor L_LLM distils knowledge into: q (paper) or h0 (authors' code)

    Built like diffusers' own output classes (``BaseOutput``: a dataclass that is also a dict,
    every field optional), because code that walks model outputs rebuilds them from a dict:
    accelerate's mixed precision wraps ``forward`` so that it returns
    ``type(out)({name: tensor.float(), ...})``. ``forward`` always sets all four fields.
    """

    c: torch.Tensor | None = None
    h0: torch.Tensor | None = None
    q: torch.Tensor | None = None
    student: torch.Tensor | None = None


class _Attention(nn.Module):
    """Single-head attention of Eq. 4-6 plus the residual MLP h1 (authors' ``Attention``)."""

    def __init__(self, dim: int, official: bool):
        super().__init__()
        self.query_layer = nn.Linear(dim, dim)  # Wq (the last part of h3)
        self.key_layer = nn.Linear(dim, dim)  # h2
        if official:  # defined but never used in the authors' forward
            self.value_layer = nn.Linear(dim, dim)
        self.output_layer = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))  # h1
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        k = self.key_layer(x)
        att = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)  # [B, N, N]
        s = att @ x + x  # V' + V with V = x
        return s + self.output_layer(s)  # V + V' + h1[V + V']


class SURAdapter(ModelMixin, ConfigMixin):
    """SUR-adapter, Eq. 4-7. ``save_pretrained``/``from_pretrained`` write safetensors.

    Args:
        text_dim: width D of the text encoder's token states (768 for SD 1.5's CLIP, 384 for MiniLM).
        num_layers, num_heads, ffn_dim, dropout: the transformer encoder (authors: 2, 8, 2048, 0.1).
        eta: the mixing weight of Eq. 7 (authors' run: 0.1).
        g_init: init of g's weight: "zeros" (paper), "kaiming_normal", "normal", "uniform" (Fig. 6).
        official: reproduce the authors' code instead of the paper (see module docstring).
        llm_dim: width of the LLM knowledge vectors; if set, the fixed W0 of Eq. 5 is stored as a
            buffer (seeded by ``w0_seed``) and saved with the adapter.
    """

    @register_to_config
    def __init__(
        self,
        text_dim: int = 768,
        num_layers: int = 2,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        eta: float = 0.1,
        g_init: str = "zeros",
        official: bool = False,
        llm_dim: int | None = None,
        w0_seed: int = 0,
    ):
        super().__init__()
        if g_init not in G_INITS:
            raise ValueError(f"g_init must be one of {G_INITS}, got {g_init!r}")
        if text_dim % num_heads:
            raise ValueError(f"text_dim ({text_dim}) must be divisible by num_heads ({num_heads})")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")

        def encoder_layer():
            return nn.TransformerEncoderLayer(
                d_model=text_dim, nhead=num_heads, dim_feedforward=ffn_dim, dropout=dropout,
                batch_first=not official,  # the authors' bug: batch_first=False on [B, N, D]
            )

        template = encoder_layer()  # nn.TransformerEncoder deep-copies it num_layers times
        if official:  # the authors keep the template as an attribute: stored, never used
            self.encoder_layer = template
        self.transformer_encoder = nn.TransformerEncoder(
            template, num_layers=num_layers, enable_nested_tensor=False
        )
        self.attention = _Attention(text_dim, official)
        self.fc = nn.Linear(text_dim, text_dim)  # g
        self._init_g(g_init, zero_bias=not official)
        self.llm_projection = KnowledgeProjection(llm_dim, text_dim, w0_seed) if llm_dim else None
        if official:
            # The template layer and the value projection never take part in forward. They stay
            # in the state dict (the authors' weights load by these names) but are frozen, so
            # no optimizer or DistributedDataParallel waits for a gradient they never get.
            # Training is unchanged: AdamW and gradient clipping skip parameters without grad.
            self.encoder_layer.requires_grad_(False)
            self.attention.value_layer.requires_grad_(False)

    def _init_g(self, how: str, zero_bias: bool) -> None:
        w = self.fc.weight
        with torch.no_grad():
            if how == "zeros":
                nn.init.zeros_(w)
            elif how == "kaiming_normal":
                nn.init.kaiming_normal_(w)
            elif how == "normal":
                nn.init.normal_(w)
            else:
                nn.init.uniform_(w)
            if zero_bias:
                nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> SURAdapterOutput:
        """x: [B, N, text_dim] token states of the simple prompt -> SURAdapterOutput."""
        if x.ndim != 3 or x.shape[-1] != self.config.text_dim:
            raise ValueError(
                f"expected text-encoder states [B, N, {self.config.text_dim}], got {tuple(x.shape)}"
            )
        h0 = self.transformer_encoder(x)
        q = self.attention.query_layer(h0)
        out = self.fc(self.attention(q, x))
        eta = self.config.eta
        c = eta * out + (1.0 - eta) * x
        return SURAdapterOutput(c=c, h0=h0, q=q, student=h0 if self.config.official else q)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' ``save_pretrained`` (safetensors), plus a manifest: the size and SHA-256 of
        every file it wrote, checked by ``from_pretrained`` (``sur_lib.infra.adapter_files``).
        (Non-finite weights are saved: a training checkpoint keeps them, marked, for the record;
        ``from_pretrained`` refuses them.)"""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        adapter_files.write_manifest(save_directory)
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load an adapter folder (``sur_lib.infra.adapter_files.check_adapter_folder`` first:
        present, complete, and as saved). Only local folders unless ``local_files_only=False`` is
        passed (a repo id then goes to the Hub); weights that do not fit the folder's
        config.json, or that are not finite, are refused with an error naming the folder."""
        name = os.fspath(pretrained_model_name_or_path)
        if kwargs.get("local_files_only", True) is not False:
            name = os.fspath(adapter_files.check_adapter_folder(name))
            kwargs["local_files_only"] = True
        with adapter_files.loading_errors(name):
            model = super().from_pretrained(name, *args, **kwargs)
        adapter_files.refuse_non_finite(model, name)
        return model

    def project_knowledge(self, k: torch.Tensor) -> torch.Tensor:
        """W0 fLLM(ps) of Eq. 5: [B, llm_dim] -> [B, text_dim]."""
        if self.llm_projection is None:
            raise ValueError("this adapter was built without llm_dim, so it has no W0 (Eq. 5)")
        return self.llm_projection(k)

    def load_authors_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load the authors' ``adapter.pt`` (their module names; needs ``official=True``)."""
        if not self.config.official:
            raise ValueError("the authors' checkpoints need SURAdapter(official=True)")
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        missing = [m for m in missing if not m.startswith("llm_projection.")]
        if missing or unexpected:
            raise ValueError(f"state dict does not match: missing {missing}, unexpected {unexpected}")


def count_parameters(adapter: SURAdapter) -> dict[str, int]:
    """Parameters stored in the state dict vs used by ``forward`` (W0 is a buffer, not counted)."""
    stored = sum(p.numel() for p in adapter.parameters())
    unused = 0
    if adapter.config.official:
        unused += sum(p.numel() for p in adapter.encoder_layer.parameters())
        unused += sum(p.numel() for p in adapter.attention.value_layer.parameters())
    return {"stored": stored, "used": stored - unused}
