"""SURD statistics (paper Fig. 4): prompt lengths, nouns, word clouds, the CLIP cleaning rule.

Everything here works offline and needs no language model or tagger download:

* ``word_count``: the number of words of a prompt, where a word is a run of letters and
  digits (apostrophes and hyphens inside a word keep it whole, punctuation is not a word):
  "4 red circles, 8k, best quality" has 6 words. The paper's Fig. 4 clips complex prompts
  at 300 words; ``clip_counts`` does the same.
* ``STOP_WORDS``: a small built-in English stop-word list (articles, pronouns,
  prepositions, conjunctions, auxiliaries, number words, common adverbs). Word clouds and
  noun counts leave these out.
* ``nouns``: a **heuristic**, not a part-of-speech tagger. A word is taken for a noun when
  it is alphabetic, at least 3 letters long, not a stop word, not in a small list of
  common adjectives (colours, sizes, prompt-style quality words) and does not have a
  typical adjective, adverb or verb ending (-ly, -ous, -ful, -ive, -less, -able, -ible,
  -ed, -ing), apart from a short list of nouns with such endings (ring, painting,
  building, ...). Plurals are reduced to the singular by rule (tomatoes -> tomato,
  cherries -> cherry, dice -> die). On SURD-mini, where the nouns are known, the book
  measures how well it does; on real captions it will miss some nouns and let through
  some verbs (spaCy or NLTK would do better, but they download their models at run time).
* ``word_cloud``: a word cloud of the content words with wordcloud's bundled font.

The CLIP cleaning rule (paper Sec. 3.1): a scraped (image, simple, complex) triple is kept
if CLIP(image, simple) >= CLIP(image, complex). The SUR world has no CLIP; its stand-in is
``attribute_support(judgement, prompt_attributes(prompt))``: the share of the attributes a
prompt states (count, colour, shape, arrangement) that the judge (``sur_lib.world.evaluate``)
confirms in the image. ``prompt_attributes`` reads both prompt styles of the SUR world:
explicit ("4 red circles, horizontal row, ...") and narrative ("four tomatoes lined up on a
table", where the noun implies colour and shape by the world's commonsense table
``toyworld.NOUNS``). ``keep_by_clip_rule`` applies the rule to two scores.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Mapping

import numpy as np

from sur_lib.world import toyworld as tw

WORD_RE = re.compile(r"[a-z0-9]+(?:['\u2019-][a-z0-9]+)*")
CLIP_AT = 300  # Fig. 4 of the paper clips complex-prompt lengths at 300 words

STOP_WORDS = frozenset("""
a about above across after again against all almost along also although always am among
an and another any anyone anything are around as at away back be because been before being
below beneath beside besides between beyond both but by can cannot could did do does doing
done down during each either else enough etc even ever every everything few for from
further had has have having he her here hers herself him himself his how however i if in
inside instead into is it its itself just least less many may me might more most much must
my myself near neither never next no nor not now of off often on once one only onto or
other others otherwise our ours ourselves out outside over own per quite rather same she
should since so some something somewhere still such than that the their theirs them
themselves then there these they this those though through throughout thus to together too
toward towards under until up upon us very via like was we were what whatever when where whether
which while who whom whose why will with within without would yet you your yours yourself
zero two three four five six seven eight nine ten eleven twelve first second third
is isn't aren't wasn't weren't don't doesn't didn't won't can't it's there's
""".split())

# Adjectives that prompts use a lot and that have no telltale ending.
COMMON_ADJECTIVES = frozenset("""
red orange yellow green blue purple white black gray grey brown pink violet golden silver
big small large tiny huge little tall short long wide narrow high low deep dark light
bright pale vivid rich fresh old young new beautiful pretty cute ugly good best better
great fine perfect sharp soft hard smooth rough clean crisp flat plain simple single
whole full empty hot cold warm cool wet dry main top-down overhead ultra hyper super
free random real solid vertical horizontal highly extra digital abstract geometric
realistic photorealistic hyperrealistic cinematic dramatic epic professional intricate
symmetrical elegant unreal straight
""".split())

# Nouns whose endings would otherwise read as a verb or adjective.
NOUN_EXCEPTIONS = frozenset("""
ring king wing thing string spring ceiling painting building clothing morning evening
sibling pudding swing sling wedding lightning icing stuffing earring drawing dumpling
bed shed sled seed feed weed reed speed breed steed hundred
family lily jelly belly fly butterfly dragonfly holly
olive archive detective vegetable
""".split())

_SUFFIXES_NOT_NOUN = ("ly", "ous", "ful", "ive", "less", "able", "ible", "ed", "ing")

_IRREGULAR_PLURALS = {"men": "man", "women": "woman", "children": "child",
                      "people": "person", "dice": "die", "mice": "mouse", "feet": "foot",
                      "teeth": "tooth", "geese": "goose", "leaves": "leaf",
                      "knives": "knife", "wolves": "wolf", "shelves": "shelf",
                      "loaves": "loaf", "halves": "half", "lives": "life"}
# words ending in s that are not plurals
_NOT_PLURAL = frozenset("glass grass dress class boss bus gas canvas lens chess moss "
                        "octopus cactus bonus status virus focus iris analysis "
                        "series species news physics mathematics jeans pants glasses "
                        "scissors trousers shorts".split())


def words(text: str) -> list[str]:
    """Lower-case word tokens of ``text`` (runs of letters and digits, see module doc)."""
    return WORD_RE.findall(text.lower())


def word_count(text: str) -> int:
    """Number of words in ``text``: "4 red circles, 8k, best quality" -> 6."""
    return len(words(text))


def word_counts(texts: Iterable[str]) -> np.ndarray:
    """``word_count`` of each text, as an int array."""
    return np.array([word_count(t) for t in texts], dtype=np.int64)


def clip_counts(counts, at: int = CLIP_AT) -> np.ndarray:
    """Counts clipped at ``at`` words, as in Fig. 4 (the last histogram bin holds the tail)."""
    return np.minimum(np.asarray(counts), at)


def singular(word: str) -> str:
    """A plural noun's singular, by rule: cherries -> cherry, tomatoes -> tomato,
    boxes -> box, dice -> die, circles -> circle; non-plurals come back unchanged."""
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if word in _NOT_PLURAL or len(word) <= 3 or not word.endswith("s"):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("oes"):
        return word[:-2]
    if word.endswith(("ches", "shes", "xes", "sses", "zzes")):
        return word[:-2]
    if word.endswith(("ss", "us", "is")):
        return word
    return word[:-1]


def is_noun_like(word: str) -> bool:
    """The noun heuristic for one lower-case word (see the module docstring)."""
    if not word.isalpha() or len(word) < 3:
        return False
    if word in STOP_WORDS or word in COMMON_ADJECTIVES:
        return False
    if word in NOUN_EXCEPTIONS:
        return True
    base = singular(word)
    if base in NOUN_EXCEPTIONS:
        return True
    return not any(word.endswith(s) and len(word) >= len(s) + 2 for s in _SUFFIXES_NOT_NOUN)


def nouns(text: str) -> list[str]:
    """The nouns of ``text`` by the heuristic, in the singular, in order (with repeats)."""
    return [singular(w) for w in words(text) if is_noun_like(w)]


def noun_frequencies(texts: Iterable[str]) -> Counter:
    """How often each noun occurs over all ``texts`` (``Counter``: ``.most_common(k)``)."""
    c: Counter = Counter()
    for t in texts:
        c.update(nouns(t))
    return c


def content_words(text: str) -> list[str]:
    """The words of ``text`` without stop words and without numbers (word-cloud input)."""
    return [w for w in words(text) if w not in STOP_WORDS and not w.isdigit()]


def word_frequencies(texts: Iterable[str]) -> Counter:
    """Counts of content words over all ``texts``."""
    c: Counter = Counter()
    for t in texts:
        c.update(content_words(t))
    return c


def word_cloud(texts: Iterable[str], width: int = 640, height: int = 320,
               max_words: int = 100, seed: int = 0, colormap: str = "viridis") -> np.ndarray:
    """A word cloud (uint8 RGB [height, width, 3]) of the content words of ``texts``.

    Stop words and numbers are removed by ``content_words`` (our tokenizer, not
    wordcloud's); the font is the one bundled with the ``wordcloud`` package, so nothing is
    downloaded. ``seed`` fixes the layout.
    """
    from wordcloud import WordCloud

    freqs = word_frequencies(texts)
    if not freqs:
        raise ValueError("no content words to draw")
    wc = WordCloud(width=width, height=height, max_words=max_words, random_state=seed,
                   background_color="white", colormap=colormap, collocations=False,
                   prefer_horizontal=0.9)
    return wc.generate_from_frequencies(dict(freqs)).to_array()


# --------------------------------------------------------------------------- cleaning rule
_OBJECT_RE = re.compile(r"\b([1-9]) (" + "|".join(tw.COLORS) + r") ("
                        + "|".join(tw.SHAPES) + r")s?\b")
_TAG_TO_ARRANGEMENT = {tag: a for a, tags in tw.ARRANGEMENT_TAGS.items() for tag in tags}
_NUMBER_WORDS = {w: i for i, w in enumerate(tw.NUMBER_WORDS) if i > 0}
# nouns by surface form (singular and plural), longest first so "golf balls" beats "balls"
_NOUN_FORMS = sorted([(info.plural, n, True) for n, info in tw.NOUNS.items()]
                     + [(n, n, False) for n in tw.NOUNS],
                     key=lambda x: -len(x[0]))
_ARRANGEMENT_TEMPLATES = [(tw.template_regex(t), key)
                          for split in tw.TEMPLATES.values() for key, ts in split.items()
                          if key in tw.ARRANGEMENTS for t in ts]


def prompt_attributes(prompt: str) -> dict:
    """The attributes a SUR-world prompt states: a dict with any of ``count``, ``color``,
    ``shape``, ``arrangement``.

    Explicit prompts: the object phrase "4 red circles" gives count, colour and shape; an
    arrangement tag ("horizontal row", "ring", ...) gives the arrangement. Narrative
    prompts: a known noun gives colour and shape (a tomato is a red circle), a number word
    the count (a singular noun without one: count 1), and an arrangement phrasing of
    ``toyworld.TEMPLATES`` the arrangement. Unknown words state nothing.
    """
    text = prompt.lower().strip()
    out: dict = {}
    m = _OBJECT_RE.search(text)
    if m:
        out.update(count=int(m.group(1)), color=m.group(2), shape=m.group(3))
        for tag in (t.strip() for t in text.split(",")):
            if tag in _TAG_TO_ARRANGEMENT:
                out["arrangement"] = _TAG_TO_ARRANGEMENT[tag]
                break
        return out
    for form, noun, plural in _NOUN_FORMS:
        if re.search(r"\b" + re.escape(form) + r"\b", text):
            info = tw.NOUNS[noun]
            out.update(color=info.color, shape=info.shape)
            nums = [_NUMBER_WORDS[w] for w in words(text) if w in _NUMBER_WORDS]
            if nums:
                out["count"] = nums[0]
            elif not plural:
                out["count"] = 1
            break
    for rx, key in _ARRANGEMENT_TEMPLATES:
        if rx.match(text):
            out["arrangement"] = key
            break
    return out


def attribute_checks(judgement: Mapping, attrs: Mapping) -> dict:
    """For each attribute the prompt states, whether the judge confirms it in the image:
    ``count`` equal, ``color`` every object of that colour (and at least one object),
    ``shape`` the majority shape, ``arrangement`` equal (as ``evaluate.score``)."""
    objs = judgement["objects"]
    checks = {}
    if "count" in attrs:
        checks["count"] = judgement["count"] == attrs["count"]
    if "color" in attrs:
        checks["color"] = bool(objs) and all(o["color"] == attrs["color"] for o in objs)
    if "shape" in attrs:
        checks["shape"] = bool(objs) and judgement["shape"] == attrs["shape"]
    if "arrangement" in attrs:
        checks["arrangement"] = judgement["arrangement"] == attrs["arrangement"]
    return checks


def attribute_support(judgement: Mapping, attrs: Mapping) -> float:
    """The stand-in for CLIP(image, prompt): the share of the stated attributes that the
    judge confirms (0 if the prompt states none)."""
    checks = attribute_checks(judgement, attrs)
    return sum(checks.values()) / len(checks) if checks else 0.0


def keep_by_clip_rule(score_simple, score_complex):
    """The SURD cleaning rule: keep a sample iff score(image, simple) >= score(image, complex).
    Works on scalars and arrays."""
    return np.asarray(score_simple) >= np.asarray(score_complex)

