"""``python -m sur_lib.experiments NAME ...`` (see ``sur_lib.experiments``)."""
from ..cli import run
from .command import main

if __name__ == "__main__":
    run(main)
