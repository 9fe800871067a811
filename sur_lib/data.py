"""SURD triples (paper Sec. 3.1): simple prompt, complex prompt, image.

SURD is stored the way the authors stored it, as an "imagefolder": one folder holding the
image files and a ``metadata.jsonl`` with one JSON object per line::

    {"file_name": "<name>.png", "text": "<simple prompt>", "prompt": "<complex prompt>"}

``text`` is the simple prompt (a BLIP caption), ``prompt`` the complex one. The real SURD
(Hugging Face ``zhongshsh/SURD``, gated) and the project's generated SURD-mini share this
layout.

Every row is checked when the dataset is built, so a broken file fails before training
starts, with the metadata path, the 1-based line number and the file name in the message.
``on_error="skip"`` drops bad rows instead and records why in ``SURDDataset.report``. The
checks, the error and the report, writing ``metadata.jsonl`` and the Hub download live in
``sur_lib.infra.surd_files``; this module is the dataset training reads.

The image transform follows the authors' training script (diffusers' train_text_to_image):
resize the shorter side to ``resolution`` (bilinear), centre or random crop, random
horizontal flip, scale to [-1, 1]. The random choices use torch's global RNG, so seeding
torch (as the training loop does per step) makes them reproducible.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image

from .infra.surd_files import METADATA_NAME, Reason, SURDError, download_surd, read_surd, to_rgb


class SURDDataset(torch.utils.data.Dataset):
    """A SURD imagefolder as a torch Dataset of (image, simple prompt, complex prompt).

    Args:
        root: folder holding ``metadata.jsonl`` and the images.
        resolution: output side R; images become [3, R, R] in [-1, 1].
        center_crop: centre crop (True, the paper) or random crop.
        random_flip: horizontal flip with probability 0.5 (torch's global RNG).
        knowledge: optional {simple prompt: 1-D tensor} (the authors' prompt2vec format);
            every row's ``text`` must have a vector, returned as ``item["knowledge"]``.
        knowledge_dim: required width of the vectors; if None, the width of the first row's
            vector, and all others must agree.
        on_error: "raise" (the first problem raises SURDError) or "skip" (bad rows are dropped,
            counted in ``self.report`` and summarised in one warning).
        check_images: open every image and ``verify()`` it at construction; "full" also
            decodes it (needed to catch truncated JPEGs; slower); False only checks existence.
        max_samples: keep at most this many valid rows (reading stops there).

    ``self.rows`` holds the kept rows, ``self.lines`` the 1-based line of each in
    metadata.jsonl, ``self.report`` what the checks found (``infra.surd_files.read_surd``).
    """

    def __init__(self, root, resolution: int = 512, center_crop: bool = True,
                 random_flip: bool = True, knowledge: Mapping[str, torch.Tensor] | None = None,
                 knowledge_dim: int | None = None, on_error: str = "raise",
                 check_images: bool | str = True, max_samples: int | None = None):
        if int(resolution) < 1:
            raise ValueError(f"resolution must be positive, not {resolution}")
        self.root = Path(root)
        self.metadata_path = self.root / METADATA_NAME
        self.resolution = int(resolution)
        self.center_crop = bool(center_crop)
        self.random_flip = bool(random_flip)
        self.knowledge = knowledge
        self.rows, self.lines, self.report, self.knowledge_dim = read_surd(
            self.root, knowledge, knowledge_dim, on_error, check_images, max_samples)

    def prompts(self) -> list[str]:
        """The simple prompts (``text``) of the kept rows, in order, with repeats."""
        return [r["text"] for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def transform(self, img: Image.Image) -> torch.Tensor:
        """PIL image -> float32 [3, R, R] in [-1, 1] (resize, crop, flip)."""
        R = self.resolution
        img = to_rgb(img)
        w, h = img.size
        if (w, h) != (R, R):  # shorter side -> R, as torchvision's Resize(int)
            if w <= h:
                size = (R, int(R * h / w))
            else:
                size = (int(R * w / h), R)
            if size != (w, h):
                img = img.resize(size, Image.Resampling.BILINEAR)
        w, h = img.size
        if self.center_crop:
            top, left = int(round((h - R) / 2.0)), int(round((w - R) / 2.0))
        else:
            top = int(torch.randint(0, h - R + 1, (1,)))
            left = int(torch.randint(0, w - R + 1, (1,)))
        img = img.crop((left, top, left + R, top + R))
        if self.random_flip and bool(torch.rand(1) < 0.5):
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())  # [R, R, 3] in 0..255
        return (x.permute(2, 0, 1) / 127.5 - 1.0).contiguous()

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        fn = row["file_name"]
        try:
            with Image.open(self.root / fn) as im:
                pixels = self.transform(im)
        except Exception as e:
            raise SURDError(self.metadata_path, Reason.BAD_IMAGE, self.lines[i], fn,
                            f"{type(e).__name__}: {e}") from e
        return self.item(i, pixels)

    def item(self, i: int, pixels: torch.Tensor) -> dict[str, Any]:
        """Row ``i`` as a training example around already transformed ``pixels``."""
        row = self.rows[i]
        item = {"pixel_values": pixels, "simple": row["text"], "complex": row["prompt"],
                "file_name": row["file_name"]}
        if self.knowledge is not None:
            item["knowledge"] = torch.as_tensor(self.knowledge[row["text"]]).to(torch.float32)
        return item


def collate(batch: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep everything else (strings) as lists. All items share their keys."""
    if not batch:
        raise ValueError("collate got an empty batch")
    out = {}
    for key in batch[0]:
        vals = [b[key] for b in batch]
        out[key] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out


def load_surd_hub(repo_id: str = "zhongshsh/SURD", split: str = "train", **kw) -> SURDDataset:
    """Download the real SURD from the Hugging Face Hub (paper profile) and open it.

    The dataset is gated: accept its terms on the Hub, run ``huggingface-cli login`` and have
    network access. ``kw`` go to :class:`SURDDataset`. The folder with metadata.jsonl is
    found in the snapshot (the one named after ``split`` if there are several).
    """
    return SURDDataset(download_surd(repo_id, split), **kw)
