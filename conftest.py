"""Let nbval collect the book's jupytext MyST notebooks: `pytest --nbval-lax book/`.

nbval only collects .ipynb files. A .md file whose front matter has a kernelspec (a jupytext
notebook) is read with jupytext here and handed to nbval's own collector, so every code
cell becomes a test item. Plain `pytest` still runs only tests/ (pyproject: testpaths).
"""
from unittest import mock


def pytest_collect_file(file_path, parent):
    opt = parent.config.option
    if file_path.suffix != ".md" or not (getattr(opt, "nbval", False)
                                         or getattr(opt, "nbval_lax", False)):
        return None
    import jupytext
    from nbval.plugin import IPyNbFile

    class JupytextNotebook(IPyNbFile):
        def collect(self):
            nb = jupytext.read(self.path)
            with mock.patch("nbval.plugin.nbformat.read", return_value=nb):
                return list(super().collect())  # nbval reads the notebook here, via jupytext

    if "kernelspec" in jupytext.read(file_path).metadata:  # notebooks only, not plain pages
        return JupytextNotebook.from_parent(parent, path=file_path)
    return None
