"""Alias: ``python -m sur_lib.experiments NAME ...``, the command the results in data/results
record, runs ``python -m sur_lib.study.experiments NAME ...``. Code imports
``sur_lib.study.experiments``; this folder only keeps the stored commands working."""
from sur_lib.infra.cli import run
from sur_lib.study.experiments.command import main

if __name__ == "__main__":
    run(main)
