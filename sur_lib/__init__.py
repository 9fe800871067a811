"""sur_lib: a small, readable re-implementation of SUR-adapter (Zhong et al., 2023).

One module per idea (the book's introduction lists them, from their docstrings):
adapter (Eq. 4-7), losses (Eq. 5, 8, 9, 10), knowledge (LLM knowledge vectors, W0),
data (SURD triples), models (backbones for the tiny and paper profiles),
train (Algorithm 1), pipeline (generation through diffusers); the SUR world: toyworld,
pretrain, evaluate (the judge), analysis (the statistics), experiments (a package, one
module per experiment), surd_stats (Fig. 4); bench (a package: the cost at paper scale);
book (the chapters' setup and formatting); shared mechanisms: fileio, provenance, cli.
"""

__version__ = "0.1.0"
