"""The shared supervised loop: batch plans, class weights."""

from __future__ import annotations

import numpy as np
import pytest

from spcxr.tasks.loop import StepBatches, class_weights


def test_epoch_plan_visits_every_row_once_per_epoch_and_is_seeded() -> None:
    rows = np.arange(100, 150)
    plan = StepBatches(rows, batch_size=16, seed=3)
    assert plan.steps_per_epoch == 4
    epoch = np.concatenate([plan.rows_of(s) for s in range(4)])
    assert len(epoch) == 64  # the last batch is topped up from the next permutation
    assert set(epoch[:50]) | set(epoch) == set(rows)
    assert len(set(epoch[:48])) == 48
    again = StepBatches(rows, batch_size=16, seed=3)
    assert all((plan.rows_of(s) == again.rows_of(s)).all() for s in range(8))
    other = StepBatches(rows, batch_size=16, seed=4)
    assert not (plan.rows_of(0) == other.rows_of(0)).all()


def test_batch_is_capped_at_the_number_of_rows() -> None:
    plan = StepBatches(np.arange(5), batch_size=64, seed=0)
    assert plan.batch_size == 5 and plan.steps_per_epoch == 1
    assert sorted(plan.rows_of(0).tolist()) == [0, 1, 2, 3, 4]


def test_balanced_sampling_equalises_classes() -> None:
    y = np.array([0] * 90 + [1] * 10)
    weights = class_weights(y, 2)[y]
    plan = StepBatches(np.arange(100), batch_size=50, seed=0, weights=weights)
    drawn = np.concatenate([plan.rows_of(s) for s in range(40)])
    share = (y[drawn] == 1).mean()
    assert 0.45 < share < 0.55


def test_class_weights_are_inverse_frequency_with_mean_one() -> None:
    w = class_weights(np.array([0, 0, 0, 1]), 3)
    assert w[2] == 0.0
    np.testing.assert_allclose(w[:2], [4 / 3 / 2, 4 / 1 / 2])
    np.testing.assert_allclose(w[0] * 3 + w[1] * 1, 4.0)


def test_phase_lr_restarts_the_schedule_after_the_probe_phase() -> None:
    from spcxr.tasks.loop import phase_lr
    from spcxr.train.schedule import cosine_schedule

    # no probe phase: one warm-up and cosine over the run
    assert [phase_lr(s, 100, 0, 1.0, 0.0, 10) for s in range(100)] == [
        cosine_schedule(s, 100, 1.0, 0.0, 10) for s in range(100)
    ]
    lrs = [phase_lr(s, 100, 40, 1.0, 0.0, 20) for s in range(100)]
    # warm-ups capped at a quarter of each phase: 10 steps, then 15 steps
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(1.0)
    assert lrs[39] < 0.01  # the probe phase decays to the floor
    assert lrs[40] == 0.0 and lrs[55] == pytest.approx(1.0)  # restart
    assert lrs[99] < 0.01
