"""The SUR world: a small synthetic world in which SUR-adapter's question can be asked.

``toyworld`` (scenes, the renderer, SURD-mini, the test prompts), ``prompts`` (the prompt sets
the experiments draw from) and ``extended_prompts`` (the larger held-out set), ``pretrain``
(the base model's pretraining), ``evaluate`` (the judge and the image-quality scores),
``surd_stats`` (SURD's statistics, paper Fig. 4), ``paths`` (every path into the
repository's ``data/``). The world uses the method and the infrastructure, never the study
(``tests/test_layers.py``).
"""
