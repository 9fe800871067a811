"""sur_lib.study.book: the chapters' setup call and formatting helpers, against hand-made values."""
import os
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


def test_md_table_labels():
    t = book.md_table([{"a": 1, "b": 2}], ["a", "b"], ["first", "`second`"])
    assert t.splitlines()[0] == "| first | `second` |" and t.splitlines()[2] == "| 1 | 2 |"
    with pytest.raises(ValueError):
        book.md_table([], ["a", "b"], ["one"])


# ------------------------------------------------------------------ the limitations chapter's tables


def test_paper_prompt_tests_recovers_counts_fisher_and_holm():
    from scipy import stats

    res = book.paper_prompt_tests()
    rows = res["rows"]
    assert len(rows) == len(book.PAPER_TABLE1) == 9
    assert rows[2]["base"] == "0/130" and rows[2]["adapter"] == "48/130"  # 36.92 % of 130
    assert rows[0]["p"] == pytest.approx(stats.fisher_exact([[96, 34], [82, 48]]).pvalue)
    # Holm by hand: sorted p times (m - i), stop at the first that is not below 0.05
    ps = sorted(r["p"] for r in rows)
    ok = [p * (len(ps) - i) < 0.05 for i, p in enumerate(ps)]
    assert res["n_holm"] == (ok.index(False) if False in ok else len(ok))
    assert res["n_sig"] == sum(p < 0.05 for p in ps)
    assert 0 < res["n_holm"] <= res["n_sig"] < len(rows)
    assert res["mean_table1"] == pytest.approx(np.mean([r[2] for r in book.PAPER_TABLE1]))


def test_sd15_vs_sur_world_rows():
    counts = {"sd_unet": 859_520_964, "tiny_unet": 1_973_795, "clip_text": 123_060_480, "minilm": 22_713_216}
    rows = book.sd15_vs_sur_world(counts)
    by = {r["what"]: r for r in rows}
    assert set(rows[0]) == {"what", "sd", "toy"} and len(by) == len(rows) == 10
    assert "123.1M" in by["text encoder"]["sd"] and "22.7M" in by["text encoder"]["toy"]
    assert "859.5M" in by["diffusion model"]["sd"] and "2.0M" in by["diffusion model"]["toy"]
    assert by["test prompts"]["toy"].startswith("15 per type")


def test_parameter_counts_from_configs():
    c = book.parameter_counts()  # meta device: shapes only
    assert round(c["sd_unet"] / 1e6, 1) == 859.5 and round(c["clip_text"] / 1e6, 1) == 123.1
    assert c["sd_unet"] > 300 * c["tiny_unet"] and c["clip_text"] > 4 * c["minilm"]


def test_deviation_rows_agree_with_the_code():
    from sur_lib import pipeline
    from sur_lib.train import TrainConfig

    rows = book.deviation_rows()
    columns = {"topic", "paper", "authors", "sur_lib", "why"}
    assert len(rows) >= 25
    assert all(set(d) == columns and all(str(d[c]).strip() for c in columns) for d in rows)
    assert len({d["topic"] for d in rows}) == len(rows)
    by = {d["topic"]: d for d in rows}
    # what the sur_lib column says is what the library does
    cfg = TrainConfig()
    paper_cfg = TrainConfig.from_yaml(book.ROOT / "sur_lib" / "configs" / "rtx3090.yaml")
    assert (cfg.eta, cfg.lambda_llm, cfg.lambda_cp, cfg.temperature) == (0.1, 1e-5, 1e-5, 1.0)
    assert (paper_cfg.batch_size, paper_cfg.learning_rate, paper_cfg.max_steps) == (16, 1e-5, 5000)
    assert cfg.gradient_path == "paper" and cfg.kl_direction == "authors" and cfg.g_init == "zeros"
    assert cfg.llm_include_bos
    assert "adapt_unconditional=False" in by["unconditional branch at inference"]["sur_lib"]
    import inspect
    assert inspect.signature(pipeline.generate).parameters["adapt_unconditional"].default is False
    assert by["η (Eq. 7)"]["sur_lib"].startswith("0.1 ") and by["λ1, λ2"]["sur_lib"] == "1e-5, 1e-5"
    assert "`official=True` stores 20.1M" in by["parameters"]["sur_lib"]
    import dataclasses

    from sur_lib.adapter import count_parameters
    from sur_lib.train import build_adapter
    n768 = {o: count_parameters(build_adapter(dataclasses.replace(paper_cfg, official_adapter=o), 768, None))
            for o in (False, True)}  # the authors' column: ~20.1M stored, ~14.0M used
    assert round(n768[True]["stored"] / 1e6, 1) == 20.1 and round(n768[True]["used"] / 1e6, 1) == 14.0
    assert n768[False]["stored"] == n768[False]["used"]
    assert by["batch"]["sur_lib"].startswith("16 (rtx3090.yaml)")


def test_peer_rows():
    rows = book.peer_rows()
    assert len(rows) >= 5 and all(set(r) == {"method", "changes", "evidence"} for r in rows)
    assert "28.6% -> 45.9%" in rows[0]["evidence"]
    assert "DPG-Bench 63.18 -> 74.91" in rows[1]["evidence"]


def test_bench_table_has_no_blank_rows():
    import json

    res = json.loads((book.ROOT / "data" / "results" / "bench_cpu-tiny.json").read_text())
    table, not_run = book.bench_table(res)
    lines = table.splitlines()
    assert "peak allocated" not in lines[0]  # a CPU file has no memory numbers: no such columns
    assert "| `paper` | 4 | fp32 | 0.100 |" in table
    assert not any("`paper+compile`" in line for line in lines)  # skipped: a sentence, not a row
    assert len(not_run) == 1 and not_run[0].startswith("`paper+compile` was skipped: torch.compile")
    assert "pass `--compile-on-cpu` to run it" in not_run[0]
    assert all("–" not in line.split("|")[4] for line in lines[2:])  # every shown row has a time
    gpu = {"configs": {
        "paper": {"status": "ok", "batch": 16, "precision": "fp16", "step_time_s": 0.25, "samples_per_s": 64.0,
                  "peak_allocated_gib": 17.2, "peak_reserved_gib": 18.0, "vs_full": {"samples_per_s": 1.3}},
        "full": {"status": "oom", "batch": 16, "gradient_accumulation": 2,
                 "at_largest_batch": {"batch": 8, "precision": "fp16", "step_time_s": 0.2, "samples_per_s": 40.0,
                                      "peak_allocated_gib": 23.0, "peak_reserved_gib": None}}}}
    table, not_run = book.bench_table(gpu)
    assert not not_run and "peak allocated GiB" in table.splitlines()[0]
    assert "| `paper` | 16 | fp16 | 0.250 | 64.0 | 17.2 | 18.0 | 1.30 |" in table
    assert "| `full` | 8 (out of memory at 16; × 2 accumulation) | fp16 | 0.200 | 40.0 | 23.0 | – | – |" in table


def test_deviation_table_has_three_columns():
    rows = [{"topic": "t", "paper": "p", "authors": "a|b", "sur_lib": "s", "why": "w"}]
    lines = book.deviation_table(rows).splitlines()
    assert lines[0] == "| topic | the paper and the authors' code | `sur_lib` default, and why |"
    assert lines[2] == "| t | **paper:** p<br>**authors' code:** a\\|b | s<br>**why:** w |"


def test_code_value_splits_long_paths():
    assert book.code_value(16) == "`16`" and book.code_value("runs/sd15") == "`runs/sd15`"
    assert book.code_value("stable-diffusion-v1-5/stable-diffusion-v1-5") == (
        "`stable-diffusion-v1-5/`<br>`stable-diffusion-v1-5`")
    assert book.code_value("/tmp/tmpab12cd34/surd-mini/") == "`/tmp/`<br>`tmpab12cd34/`<br>`surd-mini/`"
    assert book.code_value("a" * 30) == "`" + "a" * 30 + "`"  # no slash: one piece


def test_setup_caps_torch_threads_at_omp_num_threads(monkeypatch):
    """The book build runs chapters side by side with OMP_NUM_THREADS = cores / jobs
    (book/_ext/sur_book_execute.py): a chapter that asks for more threads gets that many."""
    import torch

    from sur_lib.study.book import setup

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert setup(seed=0, threads=2, quiet=False).threads == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert setup(seed=0, threads=2, quiet=False).threads == min(2, os.cpu_count() or 1)
    finally:
        torch.set_num_threads(before)
