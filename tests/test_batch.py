"""The batch type: padding layout, select/split/concat round trips."""

import torch

from verl_mtp.batch import Batch, from_samples


def _batch():
    return from_samples([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], [[-0.1, -0.2], [-0.3, -0.4, -0.5]], pad_id=0,
                        meta={"uid": ["a", "b"]})


def test_layout_left_prompts_right_responses():
    b = _batch()
    assert b.prompts.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert b.responses.tolist() == [[1, 2, 0], [3, 4, 9]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]
    assert b.rollout_log_probs[1].tolist() == torch.tensor([-0.3, -0.4, -0.5]).tolist()


def test_select_split_concat_round_trip():
    b = _batch()
    parts = b.split(2)
    assert [len(p) for p in parts] == [1, 1]
    joined = Batch.concat(parts)
    assert torch.equal(joined.input_ids, b.input_ids) and joined.meta == b.meta
    picked = b.select(torch.tensor([False, True]))
    assert picked.meta["uid"] == ["b"] and picked.responses.tolist() == [[3, 4, 9]]
