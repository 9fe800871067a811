"""Alias: ``python -m sur_lib.experiments.compose ...`` (recorded in
data/results/compose_bench.json) runs ``python -m sur_lib.study.experiments.compose ...``."""
import runpy

if __name__ == "__main__":
    runpy.run_module("sur_lib.study.experiments.compose", run_name="__main__", alter_sys=True)
