"""Alias: ``python -m sur_lib.evaluate judge-accuracy ...`` (recorded in data/results/judge.json)
runs ``python -m sur_lib.study.judge_accuracy ...``: the judge is ``sur_lib.world.evaluate``,
measuring it is the study's."""

from sur_lib.infra.cli import UsageError, run
from sur_lib.study.judge_accuracy import main


def _main(argv: list[str]) -> int:
    if argv[:1] != ["judge-accuracy"]:
        raise UsageError("usage: python -m sur_lib.evaluate judge-accuracy [--out FILE] [--n N] "
                         "[--seed S] [--size PX] (now python -m sur_lib.study.judge_accuracy ...)")
    return main(argv[1:])


if __name__ == "__main__":
    run(_main)
