"""Infrastructure the layers share: file I/O, checkpoints, a training run's bookkeeping, config
typing, provenance, the command-line errors, the headless browser.

``fileio`` (atomic writes, JSON, safetensors), ``checkpoints`` (verified, pruned, no pickle),
``run_state`` (a training run's processes, lock, checkpoints saved and resumed, CSV log, NaN
stop), ``config`` (typed dataclass fields from YAML and the command line), ``provenance``
(versions, weight digests, repository-relative paths), ``cli`` (one-line errors for every entry
point), ``headless`` (Chromium over the DevTools protocol). Nothing here imports the method, the
world or the study (``tests/test_layers.py``).
"""
