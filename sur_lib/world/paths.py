"""Every path into the repository's ``data/`` folder, in one place: the world owns them.

The method (``sur_lib/*.py``) names no folder of the repository: its functions take folders as
arguments, and the world and the study pass these (``tests/test_layers.py`` checks that no
path into ``data/`` appears in the method).
"""
from __future__ import annotations

from sur_lib.infra.provenance import ROOT

DATA = ROOT / "data"
#: the tiny profile's base model: a pixel-space UNet conditioned on MiniLM, exported by
#: ``python -m sur_lib.world.pretrain`` and loaded with ``sur_lib.models.load_tiny_backbone``
TINY_MODEL_DIR = DATA / "models" / "tiny-sur-world"
#: the adapter the ``sur`` experiment trained, shipped
ADAPTER_DIR = DATA / "models" / "sur-adapter-tiny"
#: the experiments' result files
RESULTS_DIR = DATA / "results"
#: the larger held-out prompt set (``sur_lib.world.extended_prompts``)
EXTENDED_PROMPTS_FILE = DATA / "prompts" / "extended_heldout.json"
#: convergence's committed run; its stored adapters feed ``tune``, ``retest`` and the web demo
CONVERGENCE_RUN_DIR = DATA / "runs" / "convergence"
