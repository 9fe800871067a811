import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def make_surd():
    """A function that writes ``n`` tiny SURD rows to ``root`` (random 32x32 PNGs seeded with 0,
    ``text`` cycling through ``prompts``, ``prompt`` from ``caption``) and returns ``root``: the
    dataset of the training and bad-input tests."""
    import numpy as np
    from PIL import Image

    from sur_lib.infra.surd_files import write_metadata

    def make(root, prompts, n, caption="{i} red circles"):
        rng = np.random.default_rng(0)
        rows = []
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
            rows.append({"file_name": f"{i}.png", "text": prompts[i % len(prompts)],
                         "prompt": caption.format(i=i)})
        write_metadata(root, rows)
        return root

    return make
