"""Every page of the built site fits its column: headless Chromium loads each page at 1400 px
and measures the widest element inside the main content against the content's width.

An element wider than the column is a table whose last columns sit off screen (behind a
horizontal scroll bar), a code line cut at the right edge, or a figure wider than the text.
The test reads _build/html (or $SUR_BOOK_HTML; `make test` builds it first) and skips without a
built site or without Chromium (Debian package chromium). It prints, per page, the content
width and the widest element, then fails naming every page where something overflows.
"""
import html
import json
import os
import re
from pathlib import Path

import pytest

from sur_lib.infra.headless import chromium_path, dump_dom, serve

HTML = Path(os.environ.get("SUR_BOOK_HTML", Path(__file__).resolve().parents[1] / "_build" / "html"))

WIDTH = 1400  # px, the window the screenshots use
SLACK = 1  # px of rounding allowed

#: Runs after the page (and MathJax) has settled: for every element inside the article, its
#: drawn width or, if it scrolls, the width of what it holds; the widest one is reported.
MEASURE = """<script>
window.addEventListener("load", function () {
  setTimeout(function () {
    var main = document.querySelector("article.bd-article") || document.querySelector("main");
    var width = main.clientWidth, left = main.getBoundingClientRect().left, over = [];
    // what a reader must see whole; a scroll box around one hides its overflow, not removes it
    main.querySelectorAll("table, pre, img, svg, figure, mjx-container[display], iframe, video")
        .forEach(function (el) {
      if (el.closest("mjx-assistive-mml") || (el.tagName === "svg" && el.closest("mjx-container"))) return;
      // collapsed "Show code cell" toggles: laid out but invisible until opened
      if (!el.checkVisibility({visibilityProperty: true, opacityProperty: true})) return;
      var r = el.getBoundingClientRect();
      var w = Math.max(r.right, r.left + el.scrollWidth) - left;
      if (r.width > 0 && w > width + %(slack)d) {
        var kind = {TABLE: "table", PRE: "code", "MJX-CONTAINER": "math"}[el.tagName] || "figure";
        var head = el.tagName === "TABLE" ? el.querySelector("tr") : el;
        over.push({kind: kind, width: Math.round(w),
                   text: ((head || el).textContent || el.getAttribute("alt") || "").trim().replace(/\\s+/g, " ").slice(0, 90)});
      }
    });
    over.sort(function (a, b) { return b.width - a.width; });
    document.body.setAttribute("data-widths", JSON.stringify({content: width, over: over}));
  }, 4000);
});
</script>""" % {"slack": SLACK}


def measure(pages, root: Path, exe: str) -> dict:
    """{page: {"content": px, "over": [widest elements wider than the content]}}."""
    results = {}
    server, base = serve(root, inject=MEASURE)
    try:
        for page in pages:
            dom = dump_dom(f"{base}{page}?inject", exe, virtual_ms=15000, width=WIDTH)
            found = re.search(r'data-widths="([^"]*)"', dom)
            assert found, f"{page}: the measuring script did not finish"
            results[page] = json.loads(html.unescape(found.group(1)))
    finally:
        server.shutdown()
    return results


def _site_pages():
    pages = sorted(p.name for p in HTML.glob("*.html")) if HTML.is_dir() else []
    # the book's pages (index.html is a redirect to the root page; no search or index pages)
    pages = [p for p in pages if p not in ("genindex.html", "search.html")
             and "bd-article" in (HTML / p).read_text(encoding="utf-8")]
    if not pages:
        pytest.skip(f"no built site in {HTML}: run `jupyter-book build book/` first")
    exe = chromium_path()
    if exe is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    return pages, exe


_MEASURED = {}


def _measured():
    if not _MEASURED:
        pages, exe = _site_pages()
        _MEASURED.update(measure(pages, HTML, exe))
    return _MEASURED


def _report(kinds) -> list[str]:
    lines = []
    for page, r in _measured().items():
        over = [o for o in r["over"] if o["kind"] in kinds]
        print(f"{page}: content {r['content']} px; " + (", ".join(
            f"{o['kind']} {o['width']} px" for o in over[:6]) + (" ..." if len(over) > 6 else "")
            if over else "nothing wider"))
        if over:
            lines.append(f"{page} (content {r['content']} px): " + "; ".join(
                f"{o['kind']} {o['width']} px {o['text'][:50]!r}" for o in over))
    return lines


def test_no_table_figure_or_equation_is_wider_than_the_content():
    """Tables (whose last columns would sit behind a scroll bar), figures and display
    equations fit the column of every page at 1400 px."""
    report = _report({"table", "figure", "math"})
    assert not report, "wider than the content at 1400 px:\n" + "\n".join(report)


def test_no_code_block_is_wider_than_the_content():
    """Code cells and outputs whose longest line is cut at the right edge (it scrolls)."""
    report = _report({"code"})
    assert not report, "code wider than the content at 1400 px:\n" + "\n".join(report)
