"""Alias: ``python -m sur_lib.pretrain ...`` (recorded in data/models/*/pretrain.json) runs
``python -m sur_lib.world.pretrain ...``."""
import runpy

if __name__ == "__main__":
    runpy.run_module("sur_lib.world.pretrain", run_name="__main__", alter_sys=True)
