import pytest

from verl_mtp.data.rl_dataset import PromptLoader

DATASET = [{"index": i} for i in range(10)]


def indices(batch: list[dict]) -> list[int]:
    return [item["index"] for item in batch]


def test_batches_per_epoch_and_partial_last_batch():
    assert len(PromptLoader(DATASET, 4)) == 2
    loader = PromptLoader(DATASET, 4, drop_last=False)
    assert len(loader) == 3
    assert [len(b) for b in loader] == [4, 4, 2]


def test_each_epoch_is_a_seeded_permutation():
    loader = PromptLoader(DATASET, 5, seed=3)
    epochs = [sorted(indices(loader.next_batch()) + indices(loader.next_batch())) for _ in range(3)]
    assert epochs == [list(range(10))] * 3
    first = [indices(b) for b in PromptLoader(DATASET, 5, seed=3)]
    again = [indices(b) for b in PromptLoader(DATASET, 5, seed=3)]
    other = [indices(b) for b in PromptLoader(DATASET, 5, seed=4)]
    assert first == again != other
    unshuffled = [indices(b) for b in PromptLoader(DATASET, 5, shuffle=False)]
    assert unshuffled == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def test_iteration_gives_the_rest_of_the_epoch_then_the_next_epoch():
    loader = PromptLoader(DATASET, 3)
    loader.next_batch()
    assert len(list(loader)) == 2 and loader.epoch == 0
    assert len(list(loader)) == 3 and loader.epoch == 1
    assert loader.state_dict() == {"epoch": 1, "position": 3, "seed": 0}


@pytest.mark.parametrize("consumed", range(0, 9))
def test_restored_loader_continues_exactly_across_epoch_boundaries(consumed):
    original = PromptLoader(DATASET, 3, seed=11)
    for _ in range(consumed):
        original.next_batch()
    restored = PromptLoader(DATASET, 3, seed=0)
    restored.load_state_dict(original.state_dict())
    expected = [indices(original.next_batch()) for _ in range(7)]
    assert [indices(restored.next_batch()) for _ in range(7)] == expected
    assert restored.state_dict() == original.state_dict()


def test_bad_state_and_empty_loader_fail_clearly():
    loader = PromptLoader(DATASET, 3)
    with pytest.raises(ValueError, match="position 9 is outside"):
        loader.load_state_dict({"epoch": 0, "position": 9, "seed": 0})
    with pytest.raises(ValueError, match="missing"):
        loader.load_state_dict({"epoch": 0})
    # too few prompts for one batch fails when the loader is built (before any worker starts), naming the key
    with pytest.raises(ValueError, match="data.train_batch_size=16: the training set has only 10 prompts"):
        PromptLoader(DATASET, 16)
    with pytest.raises(ValueError, match="data.gen_batch_size=12"):
        PromptLoader(DATASET, 12, key="data.gen_batch_size")
    assert len(PromptLoader(DATASET, 16, drop_last=False)) == 1
