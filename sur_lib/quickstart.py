"""A tiny end-to-end run of the whole method on a CPU, in a few minutes:

    SURD-mini (toyworld) -> SmolLM2 knowledge vectors -> train a SUR-adapter (Algorithm 1)
    -> generate with and without it -> outputs/quickstart/{grid.png, summary.json}

    python -m sur_lib.quickstart [--out outputs/quickstart] [--steps 30] [--n 64] [--seed 0]

The backbone is the tiny profile's pretrained model when it is installed in
data/models/tiny-sur-world/ (see ``sur_lib.models.load_tiny_backbone``); until then it is a
random-weight backbone of the same classes (frozen MiniLM text encoder, pixel-space UNet), and
the images are noise: this run then checks the plumbing, not the paper's claim.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from . import models, toyworld
from .data import SURDDataset
from .fileio import write_json
from .pipeline import generate
from .provenance import versions
from .train import TrainConfig, train


def _backbone(seed: int):
    try:
        return models.load_tiny_backbone(), "tiny (pretrained, shipped)"
    except FileNotFoundError as err:
        print(f"note: {err}\n      -> using a random-weight MiniLM + pixel-space UNet backbone")
        bb = models.tiny_random_backbone(text_encoder="minilm", with_vae=False, sample_size=32, seed=seed)
        return bb, "tiny-random (untrained UNet: images are noise)"


def image_grid(rows: list[list], path: Path, labels: list[str]) -> None:
    """Save rows of PIL images as one PNG with a label per row (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), len(rows[0])
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.6 * n_cols, 1.7 * n_rows), squeeze=False)
    for r, (row, label) in enumerate(zip(rows, labels)):
        for c, img in enumerate(row):
            axes[r][c].imshow(img, interpolation="nearest")
            axes[r][c].set_xticks([]), axes[r][c].set_yticks([])
        axes[r][0].set_ylabel(label, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/quickstart")
    ap.add_argument("--n", type=int, default=64, help="SURD-mini rows")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.time()
    out = Path(args.out)
    torch.manual_seed(args.seed)

    data_dir = out / "surd-mini"
    if not (data_dir / "metadata.jsonl").exists():
        toyworld.build_dataset(data_dir, n=args.n, seed=args.seed)
    backbone, backbone_name = _backbone(args.seed)

    cfg = TrainConfig(
        profile="tiny", data_dir=str(data_dir), output_dir=str(out / "run"), seed=args.seed,
        knowledge_file=str(out / "knowledge-smollm2-last.safetensors"), llm="smollm2",
        max_steps=args.steps, batch_size=8, learning_rate=1e-4, num_layers=1, num_heads=8,
        ffn_dim=768, checkpoint_every=max(1, args.steps // 2), resume=False,
    )
    t_train = time.time()
    result = train(cfg, backbone=backbone)  # computes (or reuses) the SmolLM2 knowledge cache first
    t_train = time.time() - t_train

    prompts = [p["text"] for p in toyworld.test_prompts()[::15]][:3]
    kw = dict(num_inference_steps=10, guidance_scale=2.0, seed=args.seed, num_images_per_prompt=3)
    base = generate(backbone, prompts, **kw)
    adapted = generate(backbone, prompts, adapter=result.adapter, **kw)
    rows, labels = [], []
    for i, p in enumerate(prompts):
        rows += [base[3 * i:3 * i + 3], adapted[3 * i:3 * i + 3]]
        labels += [f"base: {p[:28]}", f"SUR: {p[:28]}"]
    image_grid(rows, out / "grid.png", labels)

    summary = {
        "command": "python -m sur_lib.quickstart " + " ".join(argv or []),
        "versions": versions(("torch", "diffusers", "transformers", "sur_lib")),
        "backbone": backbone_name, "rows": len(SURDDataset(data_dir, check_images=False)),
        "steps": args.steps, "seed": args.seed,
        "train_seconds": round(t_train, 1),  # includes computing the knowledge vectors
        "total_seconds": round(time.time() - t0, 1),
        "final_losses": {k: v for k, v in _last_log_row(out / "run").items() if k.startswith("l")},
        "grid": str(out / "grid.png"),
    }
    write_json(summary, out / "summary.json")
    print(json.dumps(summary, indent=1))
    return summary


def _last_log_row(run_dir: Path) -> dict:
    from .train import read_log

    return read_log(run_dir)[-1]


if __name__ == "__main__":
    main()
