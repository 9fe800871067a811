"""sur_lib: a small, readable re-implementation of SUR-adapter (Zhong et al., 2023).

Three layers (``tools/layers.py``). The method, one module per idea (the book's introduction
lists them, from their docstrings): adapter (Eq. 4-7), losses (Eq. 5, 8, 9, 10), knowledge (LLM
knowledge vectors), data (SURD triples), models (backbones for the tiny and paper profiles),
train (Algorithm 1), pipeline (generation through diffusers), guidance (S-CFG, delayed
conditioning). The SUR world, ``sur_lib.world``: toyworld, prompts, extended_prompts, pretrain,
evaluate (the judge), surd_stats (Fig. 4). The study, ``sur_lib.study``: statistics,
experiments (a package, one module per experiment), claims, bench (a package: the cost at
paper scale), book (the chapters' setup and formatting). Shared mechanisms,
``sur_lib.infra``: fileio, checkpoints, config, provenance, cli, and the file formats,
loaders and argument checks the method leaves out (``tools/layers.py`` lists them).
"""

__version__ = "0.1.0"
