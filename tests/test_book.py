"""The book: table of contents, chapter rules, Colab notebooks, and the built
site (offline assets; the widget rendered by headless Chromium).

The checks of the built site need `jupyter-book build book/` first (they read _build/html,
or $SUR_BOOK_HTML) and skip otherwise; the widget check also skips without Chromium
(Debian packages chromium and chromium-driver).
"""
import html
import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from sur_lib.infra.headless import chromium_path, dump_dom, serve

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
HTML = Path(os.environ.get("SUR_BOOK_HTML", ROOT / "_build" / "html"))
CDN = re.compile(r"(?:https?:)?//[a-z0-9.-]*(?:cdn|unpkg|jsdelivr|cloudflare)[a-z0-9.-]*/", re.I)


def _toc_files():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for entry in toc.get("chapters", []):
        files.append(entry["file"])
    for part in toc.get("parts", []):
        files += [entry["file"] for entry in part.get("chapters", [])]
    return files


def _chapters():
    """Files of the toc that are notebooks (have a kernelspec), as jupytext notebooks."""
    jupytext = pytest.importorskip("jupytext")
    out = []
    for name in _toc_files():
        nb = jupytext.read(BOOK / f"{name}.md")
        if "kernelspec" in nb.metadata:
            out.append((name, nb))
    return out


# --------------------------------------------------------------------------- toc and config
def test_toc_is_found_from_book_folder():
    """`jupyter-book build book/` reads book/_toc.yml: a link to the top-level _toc.yml."""
    link = BOOK / "_toc.yml"
    assert link.exists(), "book/_toc.yml missing (a symlink to ../_toc.yml)"
    assert link.resolve() == (ROOT / "_toc.yml").resolve() or \
        link.read_text() == (ROOT / "_toc.yml").read_text()
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert cfg["execute"]["execute_notebooks"] == "force"
    assert cfg["bibtex_bibfiles"] == ["references.bib"] and (BOOK / "references.bib").is_file()
    assert cfg["launch_buttons"]["colab_url"].startswith("https://colab.research.google.com")


def test_config_found_by_walking_up():
    cli = pytest.importorskip("jupyter_book.cli.main")
    folder, found = cli.find_config_path(BOOK)
    assert found and folder == ROOT


def test_toc_files_exist():
    for name in _toc_files():
        assert (BOOK / f"{name}.md").is_file(), f"_toc.yml lists {name}, book/{name}.md missing"


# --------------------------------------------------------------------------- chapter rules
# pages that are one page by design (no objectives, exercises): the reproducibility summary, in
# the ML Reproducibility Challenge's form; it still runs its numbers from the result files
ONE_PAGERS = ("01_reproducibility_summary",)


def test_every_chapter_follows_the_book_rules():
    """Objectives box, time estimate, hidden setup cell with the Colab install first,
    summary, 2-4 exercises with hidden solutions, and asserts (the book's chapter rules)."""
    chapters = [(n, nb) for n, nb in _chapters() if n not in ONE_PAGERS]
    assert len(chapters) >= 2
    for name, nb in chapters:
        assert nb.metadata["kernelspec"]["name"] == "python3", name
        text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert re.search(r"\{admonition\}\s+Objectives", text), f"{name}: no objectives box"
        assert "**Time:**" in text, f"{name}: no time estimate"
        assert re.search(r"^## Summary", text, re.M), f"{name}: no summary"
        assert re.search(r"^## Exercises", text, re.M), f"{name}: no exercises"
        n_solutions = len(re.findall(r":class: dropdown", text))
        assert 2 <= n_solutions <= 4, f"{name}: {n_solutions} hidden solutions"
        setup = code[0]
        tags = set(setup.metadata.get("tags", []))
        assert tags & {"remove-input", "hide-input"}, f"{name}: setup cell not hidden"
        assert '"google.colab" in sys.modules' in setup.source, f"{name}: no Colab install"
        assert "seed" in setup.source.lower(), f"{name}: no seeds in the setup cell"
        assert any("assert " in c.source for c in code), f"{name}: asserts nothing"


def test_chapters_convert_to_colab_notebooks(tmp_path):
    """Every chapter reads as a notebook (jupytext, as the build does), setup cell first; the
    Colab notebooks are exported from the executed ones (tests/test_book_export.py)."""
    jupytext = pytest.importorskip("jupytext")
    for name, _ in _chapters():
        out = tmp_path / "book" / f"{name}.ipynb"
        out.parent.mkdir(exist_ok=True)
        jupytext.write(jupytext.read(BOOK / f"{name}.md"), out, fmt="ipynb")
        nb = jupytext.read(out)
        first = next(c for c in nb.cells if c.cell_type == "code")
        assert "google.colab" in first.source and nb.metadata["kernelspec"]["name"] == "python3"


def test_colab_button_points_at_published_ipynb():
    sys.path.insert(0, str(BOOK / "_ext"))
    try:
        import sur_book_html
    finally:
        sys.path.pop(0)

    class App:
        class config:
            colab_branch = "notebooks"

    url = "https://colab.research.google.com/github/org/repo/blob/main/book/03_surd_statistics.md"
    ctx = {"header_buttons": [{"type": "group", "buttons": [
        {"text": "Colab", "url": url}, {"text": "Binder", "url": "https://x/y.md"}]}]}
    sur_book_html._colab_to_ipynb(App, "03_surd_statistics", "page.html", ctx, None)
    buttons = ctx["header_buttons"][0]["buttons"]
    assert buttons[0]["url"] == ("https://colab.research.google.com/github/org/repo/blob/"
                                 "notebooks/book/03_surd_statistics.ipynb")
    assert buttons[1]["url"] == "https://x/y.md"


# --------------------------------------------------------------------------- the built site
def _built(page):
    path = HTML / page
    if not path.is_file():
        pytest.skip(f"{path} not built: run `jupyter-book build book/` first")
    return path.read_text(encoding="utf-8")


def test_built_site_names_no_cdn():
    pages = sorted(HTML.glob("*.html")) if HTML.is_dir() else []
    if not pages:
        pytest.skip(f"no built site in {HTML}: run `jupyter-book build book/` first")
    for page in pages:
        text = page.read_text(encoding="utf-8")
        # base64 images can contain anything; look at the markup around them only
        text = re.sub(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]+", "", text)
        text = re.sub(r'"(?:value|data)": ?"[A-Za-z0-9+/=]{200,}"', '""', text)
        assert not CDN.findall(text), f"{page.name} names a CDN: {CDN.findall(text)[:3]}"


def test_widget_page_loads_vendored_js():
    page = _built("03_surd_statistics.html")
    assert "application/vnd.jupyter.widget-state+json" in page
    srcs = re.findall(r'<script[^>]*src="([^"]+)"', page)
    assert any(s.split("?")[0].endswith("widgets/require.js") for s in srcs)
    assert any(s.split("?")[0].endswith("widgets/embed-amd.js") for s in srcs)
    assert any(s.split("?")[0].endswith("mathjax/tex-mml-chtml.js") for s in srcs)
    assert not [s for s in srcs if s.startswith(("http:", "https:", "//"))]
    for f in ("widgets/require.js", "widgets/embed-amd.js", "mathjax/tex-mml-chtml.js"):
        assert (HTML / f).is_file(), f


PROBE = """<script>
window.addEventListener("load", function () {
  function shown() {  // the widget images on screen (a Stack shows its selected child only)
    return Array.from(document.querySelectorAll("img.widget-image"))
      .filter(function (i) { return i.offsetParent !== null && i.naturalWidth > 0; })
      .map(function (i) { return i.src; });
  }
  setTimeout(function () {
    var before = shown(), select = document.querySelector(".widget-dropdown select");
    if (select) {
      select.selectedIndex = 3;
      select.dispatchEvent(new Event("change", { bubbles: true }));
    }
    setTimeout(function () {
      document.body.setAttribute("data-probe", JSON.stringify({ before: before, after: shown() }));
    }, 1000);
  }, 5000);
});
</script>"""


def test_widget_renders_in_headless_chromium():
    """The Dropdown + Stack of images renders from the state stored in the page, and picking
    another entry shows another image (the jslink runs in the browser), with no network:
    every host but 127.0.0.1 is unresolvable for this browser. Takes ~10-20 s."""
    page = _built("03_surd_statistics.html")
    exe = chromium_path()
    if exe is None:
        pytest.skip("chromium not installed (apt-get install chromium chromium-driver)")
    assert "</body>" in page
    server, base = serve(HTML, inject=PROBE)
    try:
        dom = dump_dom(f"{base}03_surd_statistics.html?inject", exe, virtual_ms=20000, timeout=75)
    finally:
        server.shutdown()
    assert re.search(r'class="[^"]*widget-dropdown', dom), "the Dropdown did not render"
    options = [html.unescape(o).replace("\xa0", " ")
               for o in re.findall(r"<option[^>]*>([^<]*)</option>", dom)]
    assert "1 object" in options and "degraded renders" in options, options
    found = re.search(r'data-probe="([^"]*)"', dom)
    assert found, "the probe script did not finish"
    probe = json.loads(html.unescape(found.group(1)))
    assert len(probe["before"]) == 1 and len(probe["after"]) == 1, probe
    assert probe["before"] != probe["after"], "the image did not change with the dropdown"
    assert "mjx-container" in dom, "MathJax did not render the page's equation"
