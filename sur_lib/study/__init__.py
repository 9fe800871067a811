"""The study: what measures the method in the SUR world and presents it in the book.

``statistics`` (intervals, tests, summaries), ``experiments`` (a package, one module per
experiment), ``claims`` (the paper's claims against the results), ``oracle`` (an oracle
teacher), ``gradient_share`` (each loss term's share of the gradient), ``step_cache`` (a
cheaper training step for the experiments), ``bench`` (a package: the cost at paper scale),
``judge_accuracy`` (the judge measured on fresh renders), ``book`` and ``book_export`` (the
chapters' helpers, the Colab notebooks), ``webdemo`` (the browser demo's files),
``quickstart`` (the method end to end in minutes). The study may import every layer.
"""
