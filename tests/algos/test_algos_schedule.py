import functools

import pytest
import torch

from verl_mtp.algos import lr_lambda


def test_warmup_then_constant():
    values = [lr_lambda(step, warmup_steps=4, total_steps=10) for step in range(6)]
    assert values == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_no_warmup_starts_at_full_lr():
    assert lr_lambda(0, warmup_steps=0, total_steps=10, style="cosine") == 1.0


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.25),
        (3, 1.0),
        (4, 1.0),  # cosine progress 0
        (7, 0.1 + 0.9 * 0.5),  # progress 3/6 = 0.5: halfway between 1 and min_lr_ratio
        (10, 0.1),  # end of training
        (25, 0.1),  # past the end: stays at the floor
    ],
)
def test_cosine_key_steps(step, expected):
    assert lr_lambda(step, warmup_steps=4, total_steps=10, style="cosine", min_lr_ratio=0.1) == pytest.approx(expected)


def test_usable_with_lambda_lr():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_lambda, warmup_steps=2, total_steps=4, style="cosine")
    )
    lrs = []
    for _ in range(5):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1.0, 2.0, 2.0, 1.0, 0.0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="cosine"):
        lr_lambda(0, 1, 10, style="polynomial")
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_lambda(0, -1, 10)
