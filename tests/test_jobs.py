"""Jobs side by side on one partial results file (sur_lib/study/experiments/jobs.py)."""
from sur_lib.study.experiments import jobs
from sur_lib.infra.fileio import write_json


def test_merge_keeps_the_other_jobs_entries_and_the_job_time_sum(tmp_path):
    path = tmp_path / "x.partial.json"
    settings = {"configs": [1, 2]}
    mine = {"settings": settings, "tried": {"0": "mine"}, "wall_time_s": 10.0}
    write_json({"settings": settings, "tried": {"0": "disk", "1": "theirs"}, "choice": {"index": 1},
                "wall_time_s": 100.0}, path)
    jobs.merge(mine, path, ("tried",), ("choice",))
    assert mine["tried"] == {"0": "mine", "1": "theirs"} and mine["choice"] == {"index": 1}
    assert mine["wall_time_s"] == 100.0  # a later write of `mine` must not undo the other job's sum
    assert jobs.add_job_time(mine, path, 5.0) == 105.0
    other = {"settings": {"configs": [3]}, "tried": {}}
    jobs.merge(other, path, ("tried",))  # another search: nothing is taken
    assert other == {"settings": {"configs": [3]}, "tried": {}}


def test_a_claim_is_exclusive_until_released(tmp_path):
    path = tmp_path / "x.partial.json"
    held = jobs.claim(path, "config/1")
    assert held is not None and jobs.claim(path, "config/1") is None
    assert jobs.claim(path, "config/2") is not None
    held.close()
    assert jobs.claim(path, "config/1") is not None
