"""The scoring pool survives reward functions that raise, hang or kill their process."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from verl_mtp.rewards.pool import ScoringPool, failure_metric

# A reward function whose misbehaviour is chosen by the response text. "ok" samples score
# float(ground_truth), so the outcome order can be checked.
MISBEHAVING_SCORER = """
import os, signal, time

def compute_score(data_source, solution_str, ground_truth, extra_info=None, offset=0.0):
    if solution_str == "raise":
        raise ValueError("grader bug")
    if solution_str == "sleep":
        time.sleep(60)
    if solution_str == "exit":
        os._exit(1)
    if solution_str == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if solution_str == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    if solution_str == "unpicklable":
        return {"score": 1.0, "callback": lambda: None}
    if solution_str == "nan":
        return float("nan")
    if solution_str == "no_score":
        return {"acc": True}
    return {"score": float(ground_truth) + offset, "pid": os.getpid()}
"""

FAILURE_SCORE = -5.0


@pytest.fixture(scope="module")
def scorer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("scorers") / "misbehaving.py"
    path.write_text(MISBEHAVING_SCORER)
    return str(path)


def calls(texts):
    return [{"data_source": "test", "solution_str": text, "ground_truth": str(i)} for i, text in enumerate(texts)]


def test_failures_cost_only_their_sample_and_the_pool_recovers(scorer_path):
    texts = ["ok", "raise", "ok", "sleep", "ok", "exit", "ok", "sigkill", "ok", "segfault", "unpicklable", "ok"]
    expected_failures = {1: "exception", 3: "timeout", 5: "crash", 7: "crash", 9: "crash", 10: "exception"}
    with ScoringPool((scorer_path, "compute_score"), num_workers=2, timeout_s=1.0, failure_score=FAILURE_SCORE) as pool:
        outcomes = pool.score(calls(texts))

        assert [outcome.failure for outcome in outcomes] == [expected_failures.get(i) for i in range(len(texts))]
        for i, outcome in enumerate(outcomes):
            if i in expected_failures:
                assert outcome.result == {"score": FAILURE_SCORE} and outcome.error
            else:
                assert outcome.result["score"] == float(i)
        assert "SIGKILL" in outcomes[7].error and "code 1" in outcomes[5].error
        assert pool.counters == {
            failure_metric("exception"): 2,
            failure_metric("timeout"): 1,
            failure_metric("crash"): 3,
        }

        again = pool.score(calls(["ok"] * 40))
        assert [outcome.result["score"] for outcome in again] == [float(i) for i in range(40)]
        assert len({outcome.result["pid"] for outcome in again}) <= 2  # workers are reused, not spawned per sample
        assert sum(pool.counters.values()) == 6


def test_in_process_mode_still_catches_exceptions(scorer_path):
    pool = ScoringPool(f"{scorer_path}:compute_score", num_workers=0, failure_score=FAILURE_SCORE,
                       scorer_kwargs={"offset": 0.5})
    outcomes = pool.score(calls(["ok", "raise", "nan", "no_score", "ok"]))
    assert [outcome.result["score"] for outcome in outcomes] == [0.5, FAILURE_SCORE, FAILURE_SCORE, FAILURE_SCORE, 4.5]
    assert "non-finite" in outcomes[2].error and "without 'score'" in outcomes[3].error
    assert pool.counters[failure_metric("exception")] == 3


def test_scorer_kwargs_reach_worker_processes(scorer_path):
    with ScoringPool((scorer_path, "compute_score"), num_workers=1, scorer_kwargs={"offset": 10.0}) as pool:
        assert [outcome.result["score"] for outcome in pool.score(calls(["ok", "ok"]))] == [10.0, 11.0]


def test_a_wrong_reference_fails_in_the_driver(tmp_path):
    with pytest.raises(FileNotFoundError):
        ScoringPool((str(tmp_path / "missing.py"), "compute_score"), num_workers=1)
    with pytest.raises(ValueError, match="fork is unsafe"):
        ScoringPool(None, mp_context="fork")


def test_close_is_idempotent_and_leaves_no_workers(scorer_path):
    pool = ScoringPool((scorer_path, "compute_score"), num_workers=1)
    pool.score(calls(["ok"]))
    processes = [worker.process for worker in pool._workers]
    pool.close()
    pool.close()
    assert not any(process.is_alive() for process in processes)
    assert processes[0].exitcode == 0  # stopped on request, not killed


def test_workers_ignore_ctrl_c(scorer_path):
    with ScoringPool((scorer_path, "compute_score"), num_workers=1) as pool:
        pool.score(calls(["ok"]))
        process = pool._workers[0].process
        os.kill(process.pid, signal.SIGINT)  # what a Ctrl-C in the terminal sends the whole group
        time.sleep(0.2)
        assert process.is_alive()


@pytest.mark.parametrize(
    "worker_only_failure, message",
    [
        ("raise ImportError('missing in workers')", "failed to load in a worker process: ImportError"),
        ("os._exit(3)", "did not start: worker exited with code 3"),
    ],
)
def test_a_function_that_cannot_load_in_workers_stops_the_batch(tmp_path, worker_only_failure, message):
    path = tmp_path / "driver_only.py"
    path.write_text(
        "import multiprocessing, os\n"
        "if multiprocessing.parent_process() is not None:\n"
        f"    {worker_only_failure}\n"
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    return 1.0\n"
    )
    with ScoringPool((str(path), "compute_score"), num_workers=1) as pool:
        with pytest.raises(RuntimeError, match=message):
            pool.score(calls(["ok"]))


def test_a_driver_that_never_closes_its_pool_still_exits(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(
        "from verl_mtp.rewards import ScoringPool\n"
        "if __name__ == '__main__':\n"
        "    pool = ScoringPool(None, num_workers=2)\n"
        "    call = {'data_source': 'synthetic_math', 'solution_str': 'Answer: 3', 'ground_truth': '3'}\n"
        "    assert pool.score([call])[0].result['acc']\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    subprocess.run([sys.executable, str(script)], env=env, timeout=30, check=True)
