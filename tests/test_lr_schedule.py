import math

import pytest

from trainer.lr_schedule import LRScheduleConfig, learning_rate


def test_warmup_then_cosine_to_min():
    cfg = LRScheduleConfig(lr=1.0, min_lr=0.1, warmup_iters=4, decay_iters=14, decay_style="cosine")
    assert [learning_rate(cfg, i) for i in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert learning_rate(cfg, 9) == pytest.approx(0.1 + 0.9 * 0.5 * (math.cos(math.pi * 0.5) + 1))
    assert learning_rate(cfg, 14) == 0.1 and learning_rate(cfg, 100) == 0.1


def test_linear_and_constant():
    linear = LRScheduleConfig(lr=1.0, min_lr=0.0, warmup_iters=0, decay_iters=10, decay_style="linear")
    assert learning_rate(linear, 5) == pytest.approx(0.5)
    constant = LRScheduleConfig(lr=2.0, decay_iters=10, decay_style="constant")
    assert learning_rate(constant, 1) == learning_rate(constant, 50) == 2.0
