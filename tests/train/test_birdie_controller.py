"""Birdie's controller (`lcjax.train.birdie_controller`): the reward's sign conventions, the paper's schedule, a
reward model that learns which arm pays and moves the mixture to it, and a run killed mid-controller resuming on the
same mixture trajectory and losses, bit for bit."""

from __future__ import annotations

import dataclasses
import signal

import jax
import numpy as np
import pytest

from lcjax.config import ObjectivesConfig
from lcjax.data import birdie_objectives as bo
from lcjax.train import birdie_controller as bc
from lcjax.train.metrics import read_metrics
from tests.train.test_resilience import (  # noqa: F401 (fixture)
    SMALL,
    _committed_steps,
    _main,
    _spawn,
    _wait_for_step,
    corpus,
    final_params,
    train_losses,
)


def test_reward_is_positive_when_a_loss_falls_with_the_code_sign_and_clipped():
    old = np.array([2.0, 2.0, 2.0, 2.0])
    new = np.array([1.0, 2.0, 2.2, 1.99])
    r = bc.reward(old, new)
    assert r[0] == 1.0 and r[1] == 0.0 and -1.0 <= r[2] < 0 and 0 < r[3] < 1e-3
    np.testing.assert_array_equal(bc.reward(old, new, "paper"), -r)
    # the formula itself at one point: Δ = −0.005, S = √(2 · 1.99)
    delta, s = -0.005, np.sqrt(2 * 1.99)
    assert np.isclose(r[3], -100 * np.e * np.tanh(np.e * s * delta**3), rtol=1e-12)


def test_the_paper_schedule_and_its_scaling():
    assert bc.evaluation_steps(5000, 1.0) == [10, 50, 250, 500, 1000, 1500, 2000, 3000, 4000, 5000]
    assert bc.evaluation_steps(12, 0.004) == [1, 2, 4, 6, 8, 12]


@pytest.mark.parametrize("kind", ["gated_ssm", "mlp"])
def test_the_reward_model_learns_which_arm_pays_and_the_mixture_moves_to_it(kind):
    """A history of random mixtures where only arm 0's loss falls, in proportion to its weight: the chosen mixture
    puts its largest weight, well above uniform, on arm 0."""
    arms = [bo.Arm(f) for f in ("next_token", "prefix_lm", "copying", "deshuffling")]
    cfg = ObjectivesConfig(
        mixture="x", reward_model=kind, reward_model_width=32, reward_model_layers=2, reward_model_steps=300
    )
    controller = bc.Controller(cfg, arms, bo.MixtureSchedule(np.full(4, 0.25)), seed=0, total_steps=10**6)
    rng = np.random.default_rng(1)
    losses = np.full(4, 3.0)
    for t in range(24):
        action = rng.dirichlet(np.ones(4))
        controller.schedule.set_from(t * 10, action)
        losses = losses * np.array([1 - 0.1 * action[0], 1.0, 1.0, 1.0]) + rng.normal(0, 1e-4, 4)
        controller.actions.append(controller.schedule.at(t * 10 + 9))
        controller.eval_at.append(t * 10 + 10)
        controller.losses.append(losses.copy())
    action, fit_loss = controller.choose(250)
    assert np.isclose(action.sum(), 1.0) and int(np.argmax(action)) == 0 and action[0] > 0.4, action
    assert np.isfinite(fit_loss)


BIRDIE = [
    "--config.train.seq_len=96",
    "--config.objectives.mixture=next_token,prefix_lm,infilling",
    "--config.objectives.length_scale=0.25",
    "--config.objectives.controller=True",
    "--config.objectives.schedule_scale=0.004",  # evaluations at 1, 2, 4, 6, 8, 12; the model from step 1
    "--config.objectives.reward_model_width=16",
    "--config.objectives.reward_model_layers=2",
    "--config.objectives.reward_model_steps=20",
    "--config.objectives.num_candidates=64",
    "--config.objectives.top_k=4",
]


def test_a_run_killed_mid_controller_resumes_on_the_same_mixtures_and_losses(tmp_path, corpus):  # noqa: F811
    """Killed (SIGKILL) after the update at step 6 and before the end, then resumed: the same mixture trajectory,
    per-arm losses, rewards, training losses and final parameters as the uninterrupted run beside it."""
    args = [*SMALL, *BIRDIE, f"--config.data.path={corpus}", "--config.train.steps=12"]
    straight, workdir = tmp_path / "straight", tmp_path / "killed"
    process = _spawn([*args, f"--workdir={workdir}"])
    uninterrupted = _spawn([*args, f"--workdir={straight}"])  # side by side
    _wait_for_step(process, workdir, 7, checkpointed=True)  # after the update at 6
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # killed, not finished
    assert max(train_losses(workdir)) < 12 and 12 not in _committed_steps(workdir)
    result = _main(*args, f"--workdir={workdir}", timeout=300)
    assert result.returncode == 0 and "resumed from" in result.stderr, result.stderr[-2000:]
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stderr.read()[-2000:]
    trajectory = read_metrics(str(straight), "birdie")
    assert sorted(trajectory) == [1, 2, 4, 6, 8, 12]
    mixtures = {s: [v for k, v in r.items() if k.startswith("mixture/")] for s, r in trajectory.items()}
    assert mixtures[1] == [1 / 3] * 3 and all(np.isclose(sum(m), 1) for m in mixtures.values())
    assert len({tuple(m) for m in mixtures.values()}) >= 4  # the controller moves it
    assert read_metrics(str(workdir), "birdie") == trajectory  # every mixture, loss and reward, exactly
    assert train_losses(workdir) == train_losses(straight)
    for a, b in zip(jax.tree.leaves(final_params(workdir)), jax.tree.leaves(final_params(straight)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_controller_state_round_trips_through_json_exactly():
    import json

    arms = [bo.Arm("next_token"), bo.Arm("copying", (8, 16))]
    cfg = dataclasses.replace(ObjectivesConfig(), mixture="x")
    a = bc.Controller(cfg, arms, bo.MixtureSchedule(np.array([0.5, 0.5])), seed=0, total_steps=100)
    a.eval_at, a.losses, a.actions = [10], [np.array([1 / 3, np.pi])], [np.array([0.5, 0.5])]
    a.schedule.set_from(10, np.array([0.1 + 1e-17, 0.9]))
    b = bc.Controller(cfg, arms, bo.MixtureSchedule(np.array([0.5, 0.5])), seed=0, total_steps=100)
    b.load(json.loads(json.dumps(a.state())))
    assert b.state() == a.state() and b.schedule.at(11).tolist() == a.schedule.at(11).tolist()
