"""``python -m sur_lib.study.bench ...`` (see ``sur_lib.study.bench``)."""
from sur_lib.infra.cli import run
from .run import main


def _main(argv: list[str]) -> int:
    main(argv)  # returns the result dict; the JSON is written to --out
    return 0


if __name__ == "__main__":
    run(_main)
