"""The quickstart's pieces: which prompts it shows, and a grid whose texts do not overlap.
(The whole run, `make quickstart`, takes minutes: its time is in the README.)"""
import itertools

import numpy as np
import pytest
from PIL import Image

from sur_lib.study import quickstart as qs


def _record(i, base, adapter):
    return ({"id": f"p{i}", "acc": base}, {"id": f"p{i}", "acc": adapter, "text": f"prompt {i}"})


def test_showcase_prompts_are_the_largest_gains():
    pairs = [_record(0, 0.5, 0.5), _record(1, 0.0, 0.5), _record(2, 0.2, 0.3), _record(3, 0.0, 0.5),
             _record(4, 0.9, 0.1)]
    result = {"conditions": {"base": {"records": [b for b, _ in pairs]},
                             "adapter": {"records": [a for _, a in pairs]}}}
    shown = qs.showcase_prompts(result, k=3)
    assert [p["id"] for p in shown] == ["p1", "p3", "p2"]  # ties by id
    assert shown[0]["base_acc"] == 0.0 and shown[0]["adapter_acc"] == 0.5
    with pytest.raises(ValueError, match="has 5 paired test prompts, need 6"):
        qs.showcase_prompts(result, k=6)


def test_grid_texts_do_not_overlap():
    """Long prompts as block titles, two-line row labels and captions: no two texts overlap,
    and no text lies on an image."""
    img = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
    titles = ["a very long simple prompt that has to wrap onto a second line because it is long",
              "five golf balls tossed about at random"]
    labels = ["base model", "your adapter (30 steps)", "stored adapter (500 steps)"] * 2
    rows = [[img] * 4 for _ in labels]
    captions = [["right", "wrong", "wrong", "right"] for _ in labels]
    fig = qs.grid_figure(rows, labels, titles, captions)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [t for t in fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_window_extent"))
             if t.get_visible() and t.get_text().strip()]
    assert sum("golf balls" in t.get_text() for t in texts) == 1
    assert any("\n" in t.get_text() for t in texts if "very long" in t.get_text())
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    for (ta, a), (tb, b) in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), f"{ta!r} overlaps {tb!r}"
    images = [ax.get_window_extent(renderer) for ax in fig.axes]
    for text, box in boxes:
        for im in images:
            assert not box.overlaps(im), f"{text!r} lies on an image"
    with pytest.raises(ValueError, match="7 rows do not split into 2 prompts"):
        qs.grid_figure(rows + rows[:1], labels + labels[:1], titles)
