"""Alias: ``python -m sur_lib.step_cache ...`` (recorded in data/results/step_cache_bench.json)
runs ``python -m sur_lib.study.step_cache ...``."""
import runpy

if __name__ == "__main__":
    runpy.run_module("sur_lib.study.step_cache", run_name="__main__", alter_sys=True)
