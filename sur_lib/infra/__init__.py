"""Infrastructure the layers share: file I/O, checkpoints, a training run's bookkeeping, config
typing, provenance, the command-line errors, the headless browser, the frozen models' files
(LLMs, text encoders), the knowledge files and SURD's files.

``fileio`` (atomic writes, JSON, safetensors, the cache folder), ``checkpoints`` (verified,
pruned, no pickle), ``run_state`` (a training run's processes, lock, checkpoints saved and
resumed, CSV log, NaN stop), ``micro_batches`` (each micro-step's rows and seed, the
DataLoader that decodes them), ``config`` (typed dataclass fields from YAML and the command
line, checked by a table of rules), ``provenance`` (versions, weight digests,
repository-relative paths), ``cli`` (one-line errors for every entry point), ``headless``
(Chromium over the DevTools protocol), ``llms`` (loading the frozen LLMs), ``text_encoders``
(CLIP's tokenizer and MiniLM, offline), ``knowledge_files`` (the two knowledge-file formats),
``extract`` (the extraction command's files and loop), ``surd_files`` (a SURD folder's
metadata.jsonl and images read and checked, metadata written, the Hub copy downloaded).
Nothing here imports the method, the world or the study (``tests/test_layers.py``).
"""
