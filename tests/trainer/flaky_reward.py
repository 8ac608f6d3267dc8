"""A reward function that misbehaves on purpose: raises, hangs, or kills its process on some inputs."""

import os
import time


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    marker = len(solution_str) % 7
    if marker == 1:
        raise ValueError("grader bug")
    if marker == 2:
        time.sleep(30)  # hangs past the timeout
    if marker == 3:
        os._exit(1)  # the grader process dies
    return {"score": 1.0 if "7" in solution_str else -1.0}
