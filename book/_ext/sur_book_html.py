"""Sphinx extension for the book's HTML: Colab links to .ipynb, and no CDN on any page.

1. The Colab launch button: sphinx-book-theme builds it from ``repository.branch`` and the
   source suffix (``.md`` here; Colab opens only ``.ipynb``). It is rewritten to
   ``.../blob/<colab_branch>/book/<chapter>.ipynb``: the notebooks that ``make notebooks``
   exports (``sur_lib.study.book_export``) and that are published on the branch ``colab_branch``
   (README, "Opening a chapter in Colab"). The other buttons (repository, issues, download) are left alone.
2. sphinx-thebe puts a CDN address (``THEBE_JS_URL``) and its loader script on every page,
   even with thebe switched off (``launch_buttons.thebe: false``), when nothing can use
   them. They are dropped from such pages, so the built site names no CDN at all (widget JS
   and MathJax are vendored in book/_extra, see _config.yml).
3. The browser demo (demo.md): when the build has finished, the model files the page loads
   are written into ``_build/html/demo/models`` by ``sur_lib.study.webdemo.export_cached`` (ONNX
   files made from ``data/models`` and the installed packages; an export of the same inputs
   is reused from the sur_lib cache), and ONNX Runtime's wasm is gzipped next to the vendored
   one (``demo/ort-wasm-simd.wasm.gz``). Nothing of this is committed. ``sur_demo_export =
   False`` (Sphinx config) skips it. When the cache lacks the export (a fresh machine: about
   2.5 minutes on one core), it is started in a process of its own as the build begins
   (``python -m sur_lib.study.webdemo export --cached``, one torch thread), so it runs beside
   the chapters' execution instead of after it; the build waits for it when it has finished.
"""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

_COLAB = re.compile(r"^(https://colab\.research\.google\.com/github/[^/]+/[^/]+/blob/)"
                    r"[^/]+/(.+?)(\.md|\.ipynb)$")


def _colab_to_ipynb(app, pagename, templatename, context, doctree):
    branch = app.config.colab_branch
    for group in context.get("header_buttons", []):
        for button in group.get("buttons", []) if isinstance(group, dict) else []:
            if button.get("text") == "Colab":
                m = _COLAB.match(button.get("url", ""))
                if m:
                    button["url"] = f"{m.group(1)}{branch}/{m.group(2)}.ipynb"


def _drop_unused_thebe(app, pagename, templatename, context, doctree):
    if context.get("use_thebe") or "script_files" not in context:
        return

    def thebe(js):
        name = getattr(js, "filename", None) or ""
        body = (getattr(js, "attributes", None) or {}).get("body", "")
        return name.endswith("sphinx-thebe.js") or "THEBE_JS_URL" in body

    context["script_files"] = [js for js in context["script_files"] if not thebe(js)]


def _start_demo_export(app):
    """Fill the export cache in a background process while the chapters execute (only when the
    book has the demo page and the cache lacks this export)."""
    app.sur_demo_export_proc = None
    if (app.builder.format != "html" or not app.config.sur_demo_export
            or not (Path(app.srcdir) / "demo.md").is_file()):
        return
    from sur_lib.study import webdemo

    if webdemo.is_cached():
        return
    log_file = Path(app.doctreedir).parent / "sur-demo-export.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log_file, "wb") as f:
        app.sur_demo_export_proc = (subprocess.Popen(
            [sys.executable, "-m", "sur_lib.study.webdemo", "export", "--cached"],
            stdout=f, stderr=subprocess.STDOUT, env=env), log_file, time.time())


def _demo_files(app, exception):
    started = getattr(app, "sur_demo_export_proc", None)
    if exception is not None or app.builder.format != "html" or not app.config.sur_demo_export:
        if started is not None:
            started[0].kill()
        return
    from sphinx.util import logging

    log = logging.getLogger(__name__)
    if started is not None:  # the export begun beside the chapters: wait for it
        proc, log_file, t0 = started
        running, t = proc.poll() is None, time.time()
        rc = proc.wait()
        log.info(f"browser demo: the background export (started {t - t0:.0f} s ago) "
                 + (f"ended {time.time() - t:.0f} s later" if running else "had ended")
                 + f", exit status {rc}; its output is in {log_file}")
        # a failed export is done again below, in this process, so that its error fails the build
    out = Path(app.outdir)
    if not (out / "demo.html").is_file():  # the demo page is not part of this build
        return
    from sur_lib.study import webdemo

    webdemo.write_wasm_gz(out / "demo")
    webdemo.export_cached(out / "demo" / "models", log=log.info)
    log.info(f"browser demo: model files in {out / 'demo' / 'models'}")


def setup(app):
    app.add_config_value("colab_branch", "notebooks", "html")
    app.add_config_value("sur_demo_export", True, "html")
    app.connect("builder-inited", _start_demo_export)
    app.connect("build-finished", _demo_files)
    # after sphinx-book-theme's add_launch_buttons (priority 501), which sets use_thebe
    app.connect("html-page-context", _colab_to_ipynb, priority=600)
    app.connect("html-page-context", _drop_unused_thebe, priority=600)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
