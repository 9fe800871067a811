"""Alias: ``python -m sur_lib.bench ...`` (recorded in data/results/bench_*.json) runs
``python -m sur_lib.study.bench ...``."""
import runpy

if __name__ == "__main__":
    runpy.run_module("sur_lib.study.bench", run_name="__main__", alter_sys=True)
