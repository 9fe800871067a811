"""The Colab notebooks (sur_lib.study.book_export, `make notebooks`): MyST turned into plain Jupyter
Markdown, glue values resolved from the executed notebook, the install cell, and the one
setting that holds the repository URL.

The checks of every exported chapter need the book built first (they read
_build/jupyter_execute, as `make notebooks` does) and skip otherwise; `make test` builds it.
The Colab check (slow: a fresh virtualenv) runs the install cell and the shortest chapter.
"""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest
import yaml

from sur_lib.study import book_export as be

ROOT = Path(__file__).resolve().parents[1]
BUILD = Path(os.environ.get("SUR_BOOK_BUILD", ROOT / "_build"))
URL = be.repository_url()
#: other people's repositories the sources may name (not this one)
THIRD_PARTY = {"https://github.com/Qrange-group/SUR-adapter",
               "https://github.com/jonschlinkert/is-plain-object",
               "https://github.com/org/repo", "https://github.com/OWNER/NAME"}  # examples
#: MyST left in a rendered notebook (the issue's list, plus any role or directive fence)
RAW_MYST = re.compile(r"\{glue|:::|\{doc\}|\{cite|\{ref\}|\{numref\}|\{term\}|```\{|\{literalinclude\}")


def _book(tmp_path):
    (tmp_path / "02_x.md").write_text("---\nkernelspec:\n  name: python3\n---\n# The SUR failure\n")
    (tmp_path / "notes.md").write_text("# Notes\n\n(sec-a)=\n## Section A\n")
    (tmp_path / "mod.py").write_text("def f(x):\n    '''doc'''\n    return x + 1\n\n\ndef g():\n    pass\n")
    (tmp_path / "references.bib").write_text(textwrap.dedent("""\
        @inproceedings{zhong2023sur, title={SUR-adapter}, booktitle={ACM MM},
          author={Zhong, Shanshan and Huang, Zhongzhan and Wen, Wushao}, year={2023}}
        @inproceedings{ho2020, title={DDPM}, booktitle={NeurIPS},
          author={Ho, Jonathan and Jain, Ajay}, year={2020}}
        """))
    return be.Book(book_dir=tmp_path, repo_url="https://github.com/org/repo")


MYST = """\
Numbers {glue:text}`acc:.1f` % and {glue:text}`name`, see {doc}`02_x` and {doc}`the notes <notes>`,
{ref}`Eq. 5 <eq-5>`, {ref}`sec-a`, {math}`x^2`, {term}`Wilson interval <Wilson>`,
{cite:p}`zhong2023sur,ho2020`; {cite:t}`ho2020`. Code `{doc}` stays.

(eq-5)=
$$
a = b \\tag{5}
$$

:::{admonition} Objectives
:class: tip
After this you can

- read {glue:text}`name`.
:::

```{note}
A note.
```

1. **Question.**

   ````{admonition} Solution
   :class: dropdown

   ```python
   print(1)
   ```
   ````

```{literalinclude} mod.py
:language: python
:pyobject: f
:caption: "mod.py: f"
```

```{list-table} Results
:header-rows: 1

* - model
  - acc
* - base
  - {glue:text}`acc:.0f`
```
"""


def test_myst_becomes_plain_markdown(tmp_path):
    ch = be.Chapter("03_x", _book(tmp_path), glue={"acc": {"text/plain": "83.456"},
                                                   "name": {"text/plain": "'tomato'"}})
    out = be.markdown(ch, MYST)
    assert "Numbers 83.5 % and tomato, see [The SUR failure](https://colab.research.google.com/" \
           "github/org/repo/blob/notebooks/book/02_x.ipynb)" in out
    assert "[the notes](https://github.com/org/repo/blob/main/book/notes.md)" in out
    assert "Eq. 5, Section A, $x^2$, Wilson interval," in out
    assert "(Zhong et al., 2023; Ho and Jain, 2020); Ho and Jain (2020)." in out
    assert "Code `{doc}` stays." in out  # code spans are left alone
    assert "(eq-5)=" not in out and "a = b \\tag{5}" in out
    assert "> **Objectives**\n>\n> After this you can\n>\n> - read tomato." in out
    assert "> **Note**\n>\n> A note." in out
    assert ("   <details>\n   <summary>Solution</summary>\n\n   ```python\n   print(1)\n   ```\n\n"
            "   </details>") in out
    assert "*mod.py: f*\n\n```python\ndef f(x):\n    '''doc'''\n    return x + 1\n```" in out
    assert "def g" not in out
    assert "**Results**\n\n| model | acc |\n|---|---|\n| base | 83 |" in out
    assert not RAW_MYST.search(out.replace("`{doc}`", "")), RAW_MYST.findall(out)
    assert ch.cited == ["zhong2023sur", "ho2020", "ho2020"]
    refs = be.references(ch.book, ch.cited)
    assert refs.startswith("## References") and refs.count("\n- ") == 2
    assert refs.index("Ho") < refs.index("Zhong")


@pytest.mark.parametrize("text, message", [
    ("{glue:text}`missing`", "03_x: {glue:text}`missing`: no glue value 'missing'"),
    ("{unknownrole}`x`", "03_x: role {unknownrole}`x` cannot be exported"),
    ("```{mermaid}\na-->b\n```", "03_x: directive {mermaid} cannot be exported"),
    ("{cite:p}`nobody2020`", "cite key 'nobody2020' is not in"),
    ("{doc}`99_none`", "{doc}`99_none`:"),
    ("{ref}`nolabel`", "{ref}`nolabel`: no heading with the label 'nolabel'"),
    ("```{literalinclude} nothere.py\n```", "03_x: literalinclude nothere.py:"),
])
def test_what_cannot_be_exported_is_an_error_naming_it(tmp_path, text, message):
    ch = be.Chapter("03_x", _book(tmp_path))
    with pytest.raises(be.ExportError) as err:
        be.markdown(ch, text)
    assert message in str(err.value)


def test_drop_colab_block_keeps_the_rest():
    src = ('import sys\n\nif "google.colab" in sys.modules:  # Colab\n    run("git clone")\n'
           '    sys.path.insert(0, "/content")\n\nfrom sur_lib.study.book import setup\nenv = setup()')
    out = be.drop_colab_block(src)
    assert out == "import sys\n\nfrom sur_lib.study.book import setup\nenv = setup()"
    assert be.drop_colab_block("x = 1") == "x = 1"


def test_every_chapter_setup_cell_loses_its_own_install():
    jupytext = pytest.importorskip("jupytext")
    for md in sorted((ROOT / "book").glob("*.md")):
        nb = jupytext.read(md)
        for cell in nb.cells:
            if cell.cell_type == "code" and "google.colab" in cell.source:
                out = be.drop_colab_block(cell.source)
                assert "google.colab" not in out and "git clone" not in out, md.name
                compile(out, md.name, "exec")
                assert "setup(" in out, md.name


def _executed_tiny_chapter(tmp_path):
    """A two-cell chapter executed the way the build does (myst_nb.glue in a real kernel)."""
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    text = textwrap.dedent("""\
        ---
        kernelspec:
          display_name: Python 3
          language: python
          name: python3
        ---
        # Tiny

        ```{code-cell} ipython3
        :tags: [hide-input]
        import sys
        if "google.colab" in sys.modules:
            raise RuntimeError("the chapter's own install must be gone")
        from myst_nb import glue
        from IPython.display import Markdown, display
        glue("acc", 0.8347 * 100, display=False)
        glue("shown", "seen", display=True)
        display(Markdown(":::{warning}\\nSee {doc}`02_x`.\\n:::"))
        print("hello")
        ```

        Accuracy {glue:text}`acc:.1f` %, {glue:text}`shown`.

        ```{code-cell} ipython3
        :tags: [remove-output]
        print("hidden output")
        ```
        """)
    nb = jupytext.reads(text, fmt="md:myst")
    nbclient.NotebookClient(nb, timeout=60, kernel_name="python3").execute()
    path = tmp_path / "build" / "jupyter_execute" / "01_tiny.ipynb"
    path.parent.mkdir(parents=True)
    nbformat.write(nb, path)
    return path


def test_export_resolves_glue_and_keeps_outputs(tmp_path):
    executed = _executed_tiny_chapter(tmp_path)
    book = _book(tmp_path)
    written = be.export_book(tmp_path / "build", tmp_path / "out", book=book)
    assert [p.name for p in written] == ["01_tiny.ipynb"]
    nb = nbformat.read(written[0], as_version=4)
    install, title, setup, prose, hidden = nb.cells
    assert install.metadata["tags"] == ["colab-install"] and "https://github.com/org/repo" in install.source
    assert "google.colab" not in setup.source and setup.metadata["jupyter"]["source_hidden"]
    assert title.source == "# Tiny" and prose.source == "Accuracy 83.5 %, seen."
    kinds = [(o.output_type, sorted(o.get("data", {}))) for o in setup.outputs]
    # the glue value not displayed is gone; the displayed one, the Markdown and the print stay
    assert ("display_data", ["text/plain"]) in kinds and ("stream", []) in kinds
    assert not any(k.startswith("application/papermill") for _, ks in kinds for k in ks)
    md = next(o for o in setup.outputs if "text/markdown" in o.get("data", {}))
    assert md.data["text/markdown"] == ("> **Warning**\n>\n> See [The SUR failure]("
                                        + be.colab_url("https://github.com/org/repo", "02_x") + ").")
    assert hidden.outputs == []
    assert nbformat.read(executed, as_version=4).cells[1].outputs  # the build's file untouched


def test_export_book_without_a_build_says_so(tmp_path):
    with pytest.raises(be.ExportError, match="no executed chapters in .*jupyter_execute"):
        be.export_book(tmp_path, book=be.Book(repo_url=URL))


# --------------------------------------------------------------------------- the repository URL
def test_repository_url_is_one_setting():
    """pyproject.toml's [project.urls] Repository is the setting; _config.yml (launch buttons),
    the chapters' clone lines, the README and any other source must name that URL, or a
    repository that is not this one (listed above)."""
    assert re.fullmatch(r"https://github\.com/[^/]+/[^/]+", URL)
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert cfg["repository"]["url"] == URL, "_config.yml repository.url differs from pyproject.toml"
    found = {}
    skip = {".venv", "_build", "outputs", "data", ".git", "node_modules", "__pycache__",
            "_extra"}  # book/_extra: vendored third-party files (their own licences name their repositories)
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
        for name in files:
            path = Path(folder) / name
            if path.suffix not in (".md", ".yml", ".py", ".toml", ".txt") and name != "Makefile":
                continue
            for m in re.finditer(r"https://github\.com/[\w.-]+/[\w.-]+", path.read_text(errors="ignore")):
                found.setdefault(m.group(0).removesuffix(".git"), []).append(str(path.relative_to(ROOT)))
    others = {u: where for u, where in found.items() if u != URL and u not in THIRD_PARTY}
    assert not others, f"repository URLs that are not the setting {URL}: {others}"
    readme = (ROOT / "README.md").read_text()
    owner_name = URL.removeprefix("https://github.com/")
    assert f"colab.research.google.com/github/{owner_name}/blob/{be.NOTEBOOKS_BRANCH}" in readme
    assert cfg["sphinx"]["config"]["colab_branch"] == be.NOTEBOOKS_BRANCH
    for link in re.findall(r"colab\.research\.google\.com/github/([^/]+/[^/]+)/", readme):
        assert link == owner_name, link


# --------------------------------------------------------------------------- the built book
def _exported(tmp_path_factory):
    executed = BUILD / "jupyter_execute"
    if not list(executed.glob("*.ipynb")):
        pytest.skip(f"no executed chapters in {executed}: build the book first (make book)")
    out = tmp_path_factory.mktemp("notebooks")
    return executed, be.export_book(BUILD, out)


def test_every_exported_chapter_renders_without_myst(tmp_path_factory):
    """Every chapter the build executed, exported and rendered to HTML by nbconvert: no raw
    MyST in the rendered prose and outputs, the outputs kept, and a References list where the
    chapter cites."""
    from nbconvert import HTMLExporter

    executed, written = _exported(tmp_path_factory)
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    chapters = [toc["root"]] + [c["file"] for c in toc["chapters"]]
    notebooks = [c for c in chapters if "kernelspec:" in (ROOT / "book" / f"{c}.md").read_text()]
    assert sorted(p.stem for p in written) == sorted(notebooks), "a chapter was not executed"
    exporter = HTMLExporter(exclude_input=True)  # the code may print MyST; the page may not
    for path in written:
        nb = nbformat.read(path, as_version=4)
        body, _ = exporter.from_notebook_node(nb)
        text = re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style)\b.*?</\1>", " ", body, flags=re.S))
        left = sorted(set(RAW_MYST.findall(text)))
        assert not left, f"{path.name}: MyST left in the rendered notebook: {left}"
        built = nbformat.read(executed / path.name, as_version=4)
        n_out = sum(len(c.get("outputs", [])) for c in nb.cells)
        assert n_out > 0 and n_out <= sum(len(c.get("outputs", [])) for c in built.cells)
        src = (ROOT / "book" / path.name).with_suffix(".md").read_text()
        if "{cite" in src:
            assert "## References" in nb.cells[-1].source, path.name
        n_solutions = src.count(":class: dropdown")
        assert "\n".join(c.source for c in nb.cells).count("<summary>Solution</summary>") == n_solutions


# --------------------------------------------------------------------------- Colab, simulated
SHORTEST = "intro"  # the chapter that runs fastest (README, "The book")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_install_cell_and_shortest_chapter_run_in_a_fresh_environment(tmp_path_factory):
    """What a Colab user runs, on this machine: a fresh virtualenv holding only the
    interpreter's standard library plus the stack Colab brings (its torch, ipykernel), a
    stand-in `google.colab` module, the install cell with a local clone in place of the URL,
    then the shortest chapter, executed top to bottom (its asserts included)."""
    executed, _ = _exported(tmp_path_factory)
    if not (executed / f"{SHORTEST}.ipynb").is_file():
        pytest.skip(f"{SHORTEST} was not executed by the build")
    tmp = tmp_path_factory.mktemp("colab")
    home = tmp / "content" / "sur-book"
    out = be.export_book(BUILD, tmp / "nb", book=be.Book(repo_url=URL),
                         install=be.install_cell(str(ROOT), str(home)), chapters=[SHORTEST])
    nb = nbformat.read(out[0], as_version=4)
    for cell in nb.cells:  # run from scratch
        if cell.cell_type == "code":
            cell.outputs = []
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    # Colab's preinstalled stack: a torch (here this machine's, not via constraints.txt) and a
    # kernel, already there as on Colab: linked from this interpreter with what they require
    torch_spec = f"torch=={_version('torch')}"
    _preinstall(venv, tmp / "preinstalled", ["torch", "ipykernel"])
    colab = tmp / "colab-standin"
    (colab / "google" / "colab").mkdir(parents=True)
    (colab / "google" / "colab" / "__init__.py").write_text('"""stand-in for Colab\'s module"""\n')
    kernels = tmp / "jupyter" / "kernels" / "colab"
    kernels.mkdir(parents=True)
    # the stand-in is imported when the kernel starts, as Colab's kernel does
    (kernels / "kernel.json").write_text(json_dumps({
        "argv": [str(py), "-m", "ipykernel_launcher", "-f", "{connection_file}",
                 "--IPKernelApp.exec_lines=['import google.colab']"],
        "display_name": "colab", "language": "python",
        "env": {"PYTHONPATH": str(colab), "OMP_NUM_THREADS": "1"}}))
    from nbclient import NotebookClient

    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(tmp / "jupyter")
    try:
        NotebookClient(nb, timeout=900, kernel_name="colab", resources={
            "metadata": {"path": str(tmp)}}).execute()
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH")
        else:
            os.environ["JUPYTER_PATH"] = old
    assert (home / "constraints.txt").is_file(), "the install cell did not clone"
    freeze = subprocess.run([str(py), "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    pins = [line for line in (ROOT / "constraints.txt").read_text().split("\n")
            if "==" in line and not line.startswith(("#", "torch=="))
            and line.split("==")[0] not in be.BUILD_ONLY]  # the notebooks never import them
    for pin in pins:
        assert pin.lower() in freeze.lower(), f"{pin} not installed by the install cell"
    assert torch_spec.split("+")[0].lower() in freeze.lower(), "Colab's torch was replaced"
    where = subprocess.run([str(py), "-c", "import sur_lib; print(sur_lib.__file__)"],
                           capture_output=True, text=True, cwd=tmp, check=True).stdout.strip()
    assert Path(where).resolve().is_relative_to(home.resolve()), f"sur_lib imported from {where}"
    assert any("assert " in c.source for c in nb.cells if c.cell_type == "code")  # it checked itself


def _preinstall(venv, folder, dists):
    """Make ``dists`` and every distribution they require (this interpreter's copies, linked
    into ``folder``, not copied) importable in ``venv`` through a .pth file, where pip counts
    them as installed: the packages a Colab runtime comes with."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    folder.mkdir(parents=True)
    todo, seen = list(dists), set()
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = distribution(name)
        except PackageNotFoundError:  # an optional part this machine does not have
            continue
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
        tops = {Path(str(f)).parts[0] for f in dist.files or ()}
        for top in tops - {"..", "__pycache__"}:
            src = Path(dist.locate_file(top))
            if src.exists() and not (folder / top).exists():
                (folder / top).symlink_to(src)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "colab-preinstalled.pth").write_text(f"{folder}\n")


def _version(dist):
    from importlib.metadata import version

    return version(dist)


def json_dumps(obj):
    import json

    return json.dumps(obj, indent=1)
