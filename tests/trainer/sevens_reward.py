"""A toy reward a random-init policy can learn in a few steps: more '7' characters score higher."""


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    sevens = solution_str.count("7")
    return {"score": min(sevens, 8) / 8.0, "acc": sevens >= 4}
