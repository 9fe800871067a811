"""sur_lib: a small, readable re-implementation of SUR-adapter (Zhong et al., 2023).

One module per idea (see DESIGN in the book's introduction):
adapter (Eq. 4-7), losses (Eq. 5, 8, 9, 10), knowledge (LLM knowledge vectors, W0),
data (SURD triples), models (backbones for the tiny and paper profiles),
train (Algorithm 1), pipeline (generation through diffusers).
"""

__version__ = "0.1.0"
