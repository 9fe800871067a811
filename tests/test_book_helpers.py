"""sur_lib.study.book: the chapters' setup call and formatting helpers, against hand-made values."""
import numpy as np
import pytest
import torch

from sur_lib.study import book


def test_setup_seeds_threads_and_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("SUR_BOOK_RESULTS", str(tmp_path))
    monkeypatch.delenv("SUR_BOOK_MODEL", raising=False)
    threads = torch.get_num_threads()
    try:
        ch = book.setup(seed=3, threads=1)
        a = (np.random.rand(), torch.rand(1).item())
        book.setup(seed=3, threads=1)
        assert (np.random.rand(), torch.rand(1).item()) == a  # same seed, same numbers
        assert ch.threads == torch.get_num_threads() == 1 and ch.seed == 3
        assert ch.results == tmp_path and ch.model_dir is None
        assert (ch.root / "sur_lib" / "study" / "book.py").is_file()
        assert ch.device in ("cpu", "cuda") and ch.elapsed() >= 0
    finally:
        torch.set_num_threads(threads)


def test_pct_and_pct_ci():
    assert book.pct(0.8347) == "83.5" and book.pct(0.8347, suffix=" %") == "83.5 %"
    assert book.pct(None) == "–" and book.pct(0.05, digits=0) == "5"
    block = {"acc": 0.8347, "lo": 0.806, "hi": 0.8604}
    assert book.pct_ci(block) == "83.5% [80.6, 86.0]"
    assert book.pct_ci(block, ci_digits=0, suffix=" %") == "83.5 % [81, 86]"
    assert book.pct_ci(block, suffix="", brackets="()", sep="–") == "83.5 (80.6–86.0)"


def test_prompt_ci_is_the_t_interval_over_prompts_clipped():
    from sur_lib.study import statistics as analysis

    recs = [{"id": i, "type": "color", "k": k, "n": 4, "acc": k / 4} for i, k in enumerate((4, 4, 3, 1))]
    block = analysis.summarize(recs)["overall"]
    got = book.prompt_ci(block)
    # mean 0.75, sd of (1, 1, .75, .25) = 0.3536, t(0.975, 3) = 3.1824 -> half 0.5626
    assert got["acc"] == pytest.approx(0.75)
    assert got["lo"] == pytest.approx(0.75 - 0.5626, abs=1e-4) and got["hi"] == 1.0  # clipped
    assert got["hi"] - got["lo"] > block["hi"] - block["lo"]  # wider than Wilson over 16 images
    assert book.pct_ci(got) == "75.0% [18.7, 100.0]"


def test_fmt_p():
    assert book.fmt_p(0.0123) == "0.012" and book.fmt_p(0.0004) == "< 0.001"
    assert book.fmt_p(0.0004, space=False) == "<0.001" and book.fmt_p(None) == "–"
    assert book.fmt_p(0.0004, prefix=True) == "p < 0.001"
    assert book.fmt_p(0.5, prefix=True) == "p = 0.500"


def test_md_table_and_escape():
    t = book.md_table([{"a": 1, "b": "x|y"}, {"a": 2, "b": "two\nlines"}], ["a", "b"])
    assert t == "| a | b |\n|---|---|\n| 1 | x\\|y |\n| 2 | two lines |"
    assert book.md_escape("a *b* [c]") == "a \\*b\\* \\[c\\]"


def test_smooth_is_a_trailing_mean():
    y = [1.0, 3.0, 5.0, 7.0]
    assert book.smooth(y, k=2).tolist() == [1.0, 2.0, 4.0, 6.0]  # first entry: itself
    rng = np.random.default_rng(0)
    y = rng.normal(size=50)
    for k in (1, 3, 8):
        loop = [np.mean(y[max(0, i + 1 - k): i + 1]) for i in range(len(y))]
        assert book.smooth(y, k) == pytest.approx(loop, rel=1e-12)


def test_names_equation_reads_ranges_and_lists():
    assert book.names_equation("SUR-adapter, Eq. 4-7.", "Eq. 6")
    assert book.names_equation("(used by Eq. 5 and Eq. 9)", "Eq. 9")
    assert book.names_equation("losses (Eq. 5, 8, 9, 10)", "Eq. 8")
    assert not book.names_equation("L_LLM of Eq. 5", "Eq. 9")
    assert not book.names_equation("Eq. 4-7", "Eq. 10")
    assert book.names_equation("One forward pass of Algorithm 1", "Algorithm 1")
    assert not book.names_equation(None, "Eq. 4")


def test_equation_table_links_every_equation_to_its_functions(monkeypatch):
    table = book.equation_table()
    for label, name, *_ in book.EQUATIONS:
        assert f"{{ref}}`{name} <{label}>`" in table
    assert "`total_loss` (sur_lib/losses.py, lines " in table
    broken = (("eq-8", "Eq. 8", "x", "05_losses_knowledge", ("sur_lib.losses:total_loss",)),)
    monkeypatch.setattr(book, "EQUATIONS", broken)  # total_loss's docstring names Eq. 10 only
    with pytest.raises(ValueError, match="does not name Eq. 8"):
        book.equation_table()


def test_every_equation_label_is_a_target_in_the_book():
    text = "".join(p.read_text() for p in (book.ROOT / "book").glob("*.md"))
    for label, *_ in book.EQUATIONS:
        assert f"({label})=" in text, label
