import pytest
import torch

from verl_mtp.algos import DynamicSamplingState, accumulate_groups, filter_groups


def test_filter_groups_keeps_varied_and_singleton_groups():
    keep = filter_groups(["a", "a", "b", "b", "c", "d", "d"], [1.0, 0.0, 1.0, 1.0, 0.5, 0.1, 0.1])
    assert keep.tolist() == [True, True, False, False, True, False, False]


def test_filter_groups_identical_floats_are_dropped_regardless_of_rounding():
    # mean of three 0.1s is not exactly 0.1 in floating point; max == min still is.
    assert not filter_groups([0, 0, 0], torch.tensor([0.1, 0.1, 0.1])).any()


def test_accumulate_over_several_batches_until_train_batch_size():
    # train_batch_size = 3 groups, n = 2 responses per prompt.
    state = DynamicSamplingState()
    step = accumulate_groups(state, ["g1", "g1", "g2", "g2"], [True, True, False, False], 3, max_num_gen_batches=5)
    assert step.take.tolist() == [True, True, False, False]
    assert step.state == DynamicSamplingState(num_groups=1, num_gen_batches=1) and step.need_more

    step = accumulate_groups(step.state, ["g3", "g3", "g4", "g4"], [False] * 4, 3, max_num_gen_batches=5)
    assert not step.take.any() and step.state == DynamicSamplingState(1, 2) and step.need_more

    # Three informative groups arrive, only two fit: the later one is dropped whole.
    uids = ["g7", "g5", "g7", "g5", "g6", "g6"]
    step = accumulate_groups(step.state, uids, [True] * 6, 3, max_num_gen_batches=5)
    assert step.take.tolist() == [True, True, True, True, False, False]
    assert step.state == DynamicSamplingState(3, 3) and not step.need_more


def test_max_num_gen_batches_exceeded_raises_naming_the_key():
    step = accumulate_groups(DynamicSamplingState(), [0, 0], [False, False], 2, max_num_gen_batches=2)
    with pytest.raises(RuntimeError, match=r"algorithm\.filter_groups\.max_num_gen_batches=2") as err:
        accumulate_groups(step.state, [1, 1, 2, 2], [True, True, False, False], 2, max_num_gen_batches=2)
    assert "1/2 groups" in str(err.value) and "\n" not in str(err.value)


def test_reaching_the_target_on_the_last_allowed_batch_is_fine():
    step = accumulate_groups(DynamicSamplingState(0, 1), [0, 0], [True, True], 1, max_num_gen_batches=2)
    assert not step.need_more


def test_non_positive_max_means_unlimited():
    state = DynamicSamplingState()
    for _ in range(20):
        step = accumulate_groups(state, [0, 0], [False, False], 1, max_num_gen_batches=0)
        state = step.state
    assert state.num_gen_batches == 20 and step.need_more
