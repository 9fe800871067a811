"""sur_lib.world.surd_stats: word counts, the noun heuristic, prompt attributes, the CLIP rule."""
import numpy as np
import pytest

from sur_lib.world import surd_stats as stats
from sur_lib.world import toyworld as tw


def test_word_count_and_clip():
    assert stats.word_count("4 red circles, 8k, best quality") == 6
    assert stats.word_count("") == 0
    assert stats.clip_counts([5, 299, 300, 1000]).tolist() == [5, 299, 300, 300]


@pytest.mark.parametrize("plural,single", [("cherries", "cherry"), ("tomatoes", "tomato"),
                                           ("boxes", "box"), ("dice", "die"),
                                           ("circles", "circle"), ("glass", "glass"),
                                           ("bus", "bus"), ("women", "woman")])
def test_singular(plural, single):
    assert stats.singular(plural) == single


def test_noun_heuristic():
    assert stats.nouns("four tomatoes lined up on a table") == ["tomato", "table"]
    assert stats.nouns("a beautiful woman walking quickly in the rain") == ["woman", "rain"]
    assert "ring" in stats.nouns("three pearls in a ring")  # noun despite its -ing
    assert stats.nouns("masterpiece, best quality, sharp focus") == ["masterpiece", "quality",
                                                                      "focus"]


def test_content_words_drop_stop_words_and_numbers():
    assert stats.content_words("There are 4 of the red circles") == ["red", "circles"]


def test_prompt_attributes_read_back_the_world():
    for i in range(300):
        _, row = tw.make_example(1, i)
        for text in (row["text"], row["prompt"]):
            attrs = stats.prompt_attributes(text)
            assert {"count", "color", "shape"} <= set(attrs), text
            assert all(row[k] == v for k, v in attrs.items()), (text, attrs)
    assert stats.prompt_attributes("four tomatoes standing in a straight line") == {
        "color": "red", "shape": "circle", "count": 4, "arrangement": "row"}
    assert stats.prompt_attributes("a purple elephant") == {}


def test_attribute_support_and_clip_rule():
    judgement = {"count": 3, "color": "red", "shape": "circle", "arrangement": "row",
                 "objects": [{"color": "red"}] * 3}
    assert stats.attribute_support(judgement, stats.prompt_attributes(
        "3 red circles, horizontal row")) == 1.0
    assert stats.attribute_support(judgement, stats.prompt_attributes(
        "four tomatoes in a row")) == 0.75  # the count is wrong
    assert stats.attribute_support(judgement, {}) == 0.0
    assert stats.keep_by_clip_rule([0.5, 1.0, 0.75], [0.5, 0.9, 1.0]).tolist() == [
        True, True, False]


def test_word_cloud_offline():
    pytest.importorskip("wordcloud")
    img = stats.word_cloud(["four tomatoes on a table", "a lime", "three limes"],
                           width=200, height=100)
    assert img.shape == (100, 200, 3) and img.dtype == np.uint8
    with pytest.raises(ValueError):
        stats.word_cloud(["the a of"])


