"""Training parity: both engines' optimiser steps agree step by step, and a real mismatch is named."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch

import parity.training as training
from flaxnets.recipes import recipe_for


def _tensors(res: training.TrainingParity) -> set[str]:
    return {r.worst for r in res.rows}


def test_lenet_adam_steps_agree_in_float64_with_float32_beside():
    res = training.check_training("lenet", 4, batch=64)
    assert res.ok, res.table()
    assert [r.step for r in res.rows] == [1, 2, 3, 4]
    assert all(r.delta < 1e-12 for r in res.rows)
    # float32 rounding is real and reported, far above float64's
    assert all(r.delta_f32 > 100 * r.delta for r in res.rows)
    assert all(abs(r.loss_torch - r.loss_flax) < 1e-12 for r in res.rows)
    table = res.table()
    assert table.count("\n| ") == 1 + 4 and "lenet: PASS" in table and "optax.adam" in table


def test_sgd_momentum_with_dampening_in_torch_fails_at_the_second_step(monkeypatch):
    """torch's dampening has no optax option: with it on the torch side the first step still agrees
    (the first momentum buffer is the gradient) and the second is named as the first failure."""
    recipe = dataclasses.replace(recipe_for("net"), momentum=0.9)
    assert training.check_training("net", 2, recipe=recipe).ok

    def damped(recipe, params):
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, dampening=0.1)

    monkeypatch.setattr(training, "torch_optimizer", damped)
    res = training.check_training("net", 3, recipe=recipe)
    assert not res.ok
    assert res.rows[0].delta <= training.TRAIN_RTOL < res.rows[1].delta
    assert res.first_failure.step == 2
    assert res.failure.startswith(f"net: step 2: {res.rows[1].worst} differs by")
    assert "FAIL net: step 2" in res.table()


def test_dropout_masks_are_the_same_on_both_sides(monkeypatch):
    res = training.check_training("net_dropout", 2)
    assert res.ok, res.table()
    assert any(n.startswith("dropout:") for n in res.notes)
    # torch drawing its own masks instead: the very first step differs
    monkeypatch.setattr(training, "_torch_masks", lambda *a: contextlib.nullcontext())
    res = training.check_training("net_dropout", 1)
    assert not res.ok and res.first_failure.step == 1


def test_l2_penalty_and_batchnorm_statistics_are_compared():
    res = training.check_training("net_batchnorm", 3, batch=16)
    assert res.ok, res.table()
    assert any("L2 penalty" in n for n in res.notes)


@pytest.mark.slow
def test_resnet20_momentum_decay_schedule_and_augmentation_agree():
    res = training.check_training("resnet20", 5, batch=32)
    assert res.ok, res.table()
    assert [r.lr for r in res.rows] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])
    assert any(n.startswith("schedule compressed") for n in res.notes)
    assert any(n.startswith("augmentation") for n in res.notes)


def test_the_schedule_is_compressed_onto_the_steps():
    recipe, notes = training._schedule(recipe_for("resnet20"), 5)
    assert recipe.milestones == (2, 4) and "steps 3, 5" in notes[0]
    same, none = training._schedule(recipe_for("lenet"), 5)
    assert same == recipe_for("lenet") and none == []


@pytest.mark.parametrize("kw, message", [({"steps": 0}, "steps must be at least 1"),
                                         ({"steps": 2, "batch": 0}, "batch must be at least 1")])
def test_bad_arguments_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        training.check_training("lenet", **kw)


def test_relative_delta_of_a_zero_tensor_is_absolute():
    assert training._rel(np.zeros(3), np.full(3, 1e-9)) == pytest.approx(1e-9)
    assert training._rel(np.array([2.0, -4.0]), np.array([2.0, -3.0])) == pytest.approx(0.25)


def test_cli_prints_one_row_per_step_and_exits_by_the_verdict(capsys, monkeypatch):
    from scripts.parity import main

    assert main(["--net", "lenet", "--train-steps", "2", "--batch", "32"]) == 0
    out = capsys.readouterr().out
    assert "| 1 | 0.001 |" in out and "| 2 | 0.001 |" in out and "lenet: PASS" in out
    monkeypatch.setattr(training, "_torch_masks", lambda *a: contextlib.nullcontext())
    assert main(["--net", "net_dropout", "--train-steps", "1", "--batch", "8"]) == 1
    assert "FAIL net_dropout: step 1: " in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [(["--net", "lenet", "--train-steps", "0"], "at least 1"),
                                           (["--train-steps", "3"], "checks one net")])
def test_cli_refuses_bad_train_steps(capsys, argv, message):
    from scripts.parity import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
