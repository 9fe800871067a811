"""Jobs side by side on one partial results file (sur_lib/study/experiments/jobs.py)."""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

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


def _job(path, units_of, log, name, wait=True, deadline=None):
    """One job on the partial file ``path``: its own copy of the file in memory, synced under
    the lock. ``units_of(partial, log, name)`` gives its units."""
    partial = {"done": {}}

    def sync():
        jobs.merge(partial, path, ("done",))

    jobs.run_units(partial, path, sync, lambda: units_of(partial, log, name),
                   deadline or jobs.Deadline(None), wait=wait)
    return partial


def _sleepy_units(partial, log, job, keys=tuple("abcdef")):
    def work(key):
        def run():
            log.append((job, key))
            time.sleep(0.2)
            return job
        return run
    return [jobs.Unit(k, work(k), partial["done"]) for k in keys]


def test_two_jobs_on_one_list_do_disjoint_units_and_the_file_has_all(tmp_path):
    path = tmp_path / "x.partial.json"
    log, out = [], {}
    threads = [threading.Thread(target=lambda n=n: out.update({n: _job(path, _sleepy_units, log, n)}))
               for n in ("A", "B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    keys = [k for _, k in log]
    assert sorted(keys) == list("abcdef")  # every unit once: no unit done by both jobs
    assert {j for j, _ in log} == {"A", "B"}  # and both did some
    disk = jobs.read(path)["done"]
    assert disk == {k: j for j, k in log}  # merged: each result from the job that did it
    assert out["A"]["done"] == out["B"]["done"] == disk  # each job waited for the other's units


def test_a_job_waits_for_a_held_unit_and_goes_on_when_it_is_released(tmp_path):
    """A unit another job holds is waited for on its claim (no 30 s sleep), and a unit listed
    only once that one is stored (retest's strong variants) is done right after."""
    path = tmp_path / "x.partial.json"
    held = jobs.claim(path, "first")  # the other job is on "first"
    log = []

    def units_of(partial, log, job):
        yield jobs.Unit("first", lambda: log.append("first") or job, partial["done"])
        if "first" in partial["done"]:
            yield jobs.Unit("second", lambda: log.append("second") or job, partial["done"])

    out = {}
    t = threading.Thread(target=lambda: out.update(job=_job(path, units_of, log, "B")))
    t.start()
    time.sleep(0.3)
    assert t.is_alive() and log == []  # blocked on the claim
    with jobs.locked(path):
        write_json({"done": {"first": "A"}}, path)  # the other job stores its unit...
    t0 = time.time()
    held.close()  # ...and lets its claim go
    t.join(timeout=10)
    assert not t.is_alive() and time.time() - t0 < 5
    assert log == ["second"] and out["job"]["done"] == {"first": "A", "second": "B"}


def test_a_waiting_claim_has_a_timeout_and_gives_the_lock_back_when_late(tmp_path):
    path = tmp_path / "x.partial.json"
    held = jobs.claim(path, "u")
    t0 = time.time()
    assert jobs.claim(path, "u", wait=True, timeout=0.2) is None and time.time() - t0 < 2
    threading.Timer(0.2, held.close).start()
    got = jobs.claim(path, "u", wait=True, timeout=10)  # the late helper of the first wait
    assert got is not None  # does not keep the lock it gets after its timeout
    got.close()


def test_the_deadline_bounds_a_wait(tmp_path):
    path = tmp_path / "x.partial.json"
    held = jobs.claim(path, "a")
    log = []
    t0 = time.time()
    partial = _job(path, _sleepy_units, log, "B", deadline=jobs.Deadline(1 / 60))  # 1 s
    assert time.time() - t0 < 10 and "a" not in partial["done"]
    assert sorted(k for _, k in log) == list("bcdef")
    held.close()


def test_a_killed_jobs_unit_is_taken_over_by_the_job_waiting_for_it(tmp_path):
    """The claim is a flock: it goes with the process, so a job killed mid-unit blocks no one."""
    path = tmp_path / "x.partial.json"
    code = ("import importlib.util, sys, time\n"  # jobs.py alone: the package takes seconds to import
            f"spec = importlib.util.spec_from_file_location('jobs', {jobs.__file__!r})\n"
            "jobs = sys.modules['jobs'] = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(jobs)\n"
            f"h = jobs.claim({str(path)!r}, 'a'); print('held', flush=True); time.sleep(600)")
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert other.stdout.readline().strip() == "held"
        assert jobs.claim(path, "a") is None
        log, out = [], {}
        t = threading.Thread(target=lambda: out.update(job=_job(
            path, lambda p, lg, j: _sleepy_units(p, lg, j, keys=("a", "b")), log, "B")))
        t.start()
        t.join(timeout=2)
        assert t.is_alive() and log == [("B", "b")]  # "b" done, waiting for "a"
        other.kill()
        t.join(timeout=10)
        assert not t.is_alive() and log == [("B", "b"), ("B", "a")]
        assert jobs.read(path)["done"] == {"a": "B", "b": "B"}
    finally:
        other.kill()
        other.wait()
