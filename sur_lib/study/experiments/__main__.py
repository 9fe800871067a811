"""``python -m sur_lib.study.experiments NAME ...`` (see ``sur_lib.study.experiments``)."""
from sur_lib.infra.cli import run
from .command import main

if __name__ == "__main__":
    run(main)
