"""Needle kinematics against closed-form arcs, batch == single, torsion model, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from needle_steering.control.geometry import rot_z, se3_exp, se3_exp_batch
from needle_steering.control.needle_model import (
    NeedleCommand,
    NeedleParams,
    NeedleState,
    TissueParams,
    arc_points_tip_mm,
    arc_to_point,
    step_needle,
    step_needles_batch,
)
from needle_steering.errors import ControlError


def _insert(
    state: NeedleState,
    cmd: NeedleCommand,
    n: int,
    dt: float,
    needle: NeedleParams,
    *,
    tissue: TissueParams | None = None,
) -> tuple[NeedleState, np.ndarray]:
    tis = tissue or TissueParams()
    out = [state.position_mm.copy()]
    for _ in range(n):
        state = step_needle(state, cmd, dt, needle, tis)
        out.append(state.position_mm.copy())
    return state, np.array(out)


def test_constant_curvature_traces_circle_of_radius_one_over_kappa() -> None:
    kappa = 0.01
    needle = NeedleParams(kappa)
    state, pts = _insert(NeedleState.from_pose(np.eye(4)), NeedleCommand(2.0, 0.0, 0.0), 400, 0.1, needle)
    s = 2.0 * 0.1 * np.arange(401)
    # bends toward +y in the y-z plane: y = (1 - cos ks)/k, z = sin(ks)/k
    expected = np.stack([np.zeros_like(s), (1 - np.cos(kappa * s)) / kappa, np.sin(kappa * s) / kappa], axis=1)
    np.testing.assert_allclose(pts, expected, atol=1e-9)
    radius = np.linalg.norm(pts - np.array([0.0, 1.0 / kappa, 0.0]), axis=1)
    np.testing.assert_allclose(radius, 1.0 / kappa, atol=1e-9)
    # the tip axis stays tangent to the circle
    np.testing.assert_allclose(
        state.T_world_from_tip[:3, 2], [0.0, math.sin(kappa * 80), math.cos(kappa * 80)], atol=1e-12
    )
    assert state.inserted_length_mm == pytest.approx(80.0)


def test_integration_is_exact_whatever_the_step() -> None:
    needle = NeedleParams(0.02)
    cmd = NeedleCommand(3.0, 0.7, 0.25)
    coarse, _ = _insert(NeedleState.from_pose(np.eye(4)), cmd, 2, 5.0, needle)
    fine, _ = _insert(NeedleState.from_pose(np.eye(4)), cmd, 1000, 0.01, needle)
    np.testing.assert_allclose(coarse.T_world_from_tip, fine.T_world_from_tip, atol=1e-9)


def test_roll_by_pi_flips_the_bending_plane() -> None:
    needle = NeedleParams(0.01)
    start = NeedleState.from_pose(np.eye(4))
    # rotate in place by pi (v = 0), then insert
    rolled = step_needle(start, NeedleCommand(0.0, math.pi, 0.0), 1.0, needle)
    a, _ = _insert(start, NeedleCommand(2.0, 0.0, 0.0), 200, 0.1, needle)
    b, _ = _insert(rolled, NeedleCommand(2.0, 0.0, 0.0), 200, 0.1, needle)
    pa, pb = a.position_mm, b.position_mm
    assert pa[1] > 5.0
    np.testing.assert_allclose(pb, [pa[0], -pa[1], pa[2]], atol=1e-9)


def test_duty_cycling_scales_curvature() -> None:
    kappa, duty = 0.012, 0.6
    needle = NeedleParams(kappa)
    _, pts = _insert(NeedleState.from_pose(np.eye(4)), NeedleCommand(2.0, 0.0, duty), 300, 0.1, needle)
    k_eff = kappa * (1 - duty)
    centre = np.array([0.0, 1.0 / k_eff, 0.0])
    np.testing.assert_allclose(np.linalg.norm(pts - centre, axis=1), 1.0 / k_eff, atol=1e-8)
    _, straight = _insert(NeedleState.from_pose(np.eye(4)), NeedleCommand(2.0, 0.0, 1.0), 10, 0.1, needle)
    np.testing.assert_allclose(straight[:, :2], 0.0, atol=1e-12)


def test_tissue_curvature_scale_multiplies_curvature() -> None:
    needle = NeedleParams(0.01)
    _, pts = _insert(
        NeedleState.from_pose(np.eye(4)), NeedleCommand(1.0, 0.0, 0.0), 100, 0.5, needle, tissue=TissueParams(1.3)
    )
    np.testing.assert_allclose(np.linalg.norm(pts - [0.0, 1 / 0.013, 0.0], axis=1), 1 / 0.013, atol=1e-8)


def test_arc_helpers_match_the_model() -> None:
    needle = NeedleParams(0.01)
    bend = 0.8
    start = NeedleState.from_pose(rot_z(bend))
    end, _ = _insert(start, NeedleCommand(2.0, 0.0, 0.0), 250, 0.1, needle)
    closed = arc_points_tip_mm(0.01, bend, np.array([50.0]))[0]
    np.testing.assert_allclose(end.position_mm, closed, atol=1e-9)
    kappa, bend_back, length = arc_to_point(closed)
    assert kappa == pytest.approx(0.01)
    assert bend_back == pytest.approx(bend)
    assert length == pytest.approx(50.0)


def test_torsion_lag_and_deadband() -> None:
    tau, band = 0.1, 0.05
    needle = NeedleParams(0.01, tau, band)
    omega = 2.0
    state = NeedleState.from_pose(np.eye(4))
    # a small base rotation inside the dead-band does not turn the tip
    small = step_needle(state, NeedleCommand(0.0, omega, 0.0), 0.02, needle)
    np.testing.assert_allclose(small.T_world_from_tip, np.eye(4), atol=1e-15)
    assert small.torsion_windup_rad == pytest.approx(0.04)
    # steady rotation: wind-up settles at band + omega*tau, tip turns at omega
    s = state
    for _ in range(200):
        s = step_needle(s, NeedleCommand(0.0, omega, 0.0), 0.01, needle)
    assert s.torsion_windup_rad == pytest.approx(band + omega * tau, rel=1e-6)
    tip_roll = math.atan2(s.T_world_from_tip[1, 0], s.T_world_from_tip[0, 0])
    expected = omega * 2.0 - (band + omega * tau)
    assert tip_roll == pytest.approx(math.atan2(math.sin(expected), math.cos(expected)), abs=1e-6)
    # stopping the base: the elastic part relaxes back to the dead-band edge, backlash remains
    for _ in range(300):
        s = step_needle(s, NeedleCommand(0.0, 0.0, 0.0), 0.01, needle)
    assert s.torsion_windup_rad == pytest.approx(band, abs=1e-9)


def test_batch_equals_single() -> None:
    rng = np.random.default_rng(3)
    n = 7
    needle = NeedleParams(0.011, 0.04, 0.02)
    v = rng.uniform(0.5, 4.0, n)
    omega = rng.normal(0.0, 3.0, n)
    duty = rng.uniform(0.0, 1.0, n)
    scale = rng.uniform(0.8, 1.2, n)
    T = np.stack([rot_z(a) for a in rng.uniform(-3, 3, n)])
    T[:, :3, 3] = rng.normal(0, 10, (n, 3))
    states = [NeedleState.from_pose(T[i]) for i in range(n)]
    windup = np.zeros(n)
    for k in range(60):
        om_k = omega * (1 if k < 30 else -1)
        T, windup = step_needles_batch(
            T, v, om_k, duty, dt_s=0.03, needle=needle, curvature_scale=scale, torsion_windup_rad=windup
        )
        states = [
            step_needle(st, NeedleCommand(v[i], om_k[i], duty[i]), 0.03, needle, TissueParams(scale[i]))
            for i, st in enumerate(states)
        ]
    for i in range(n):
        np.testing.assert_allclose(T[i], states[i].T_world_from_tip, atol=1e-12)
        assert windup[i] == pytest.approx(states[i].torsion_windup_rad, abs=1e-12)


def test_se3_exp_batch_matches_single_including_small_angles() -> None:
    rng = np.random.default_rng(0)
    rho = rng.normal(size=(6, 3))
    phi = rng.normal(size=(6, 3))
    phi[0] = 0.0
    phi[1] *= 1e-7
    batch = se3_exp_batch(rho, phi)
    for i in range(6):
        np.testing.assert_allclose(batch[i], se3_exp(rho[i], phi[i]), atol=1e-13)
        R = batch[i, :3, :3]
        np.testing.assert_allclose(R.T @ R, np.eye(3), atol=1e-12)


@pytest.mark.parametrize(
    ("v", "omega", "duty"),
    [(math.nan, 0.0, 0.0), (1.0, math.inf, 0.0), (-1.0, 0.0, 0.0), (1.0, 0.0, 1.5)],
)
def test_invalid_commands_raise(v: float, omega: float, duty: float) -> None:
    with pytest.raises(ControlError):
        NeedleCommand(v, omega, duty)


def test_invalid_poses_and_steps_raise() -> None:
    bad = np.eye(4)
    bad[0, 3] = math.nan
    with pytest.raises(ControlError, match="non-finite"):
        NeedleState.from_pose(bad)
    with pytest.raises(ControlError, match="rigid"):
        NeedleState.from_pose(np.diag([2.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ControlError, match="dt_s"):
        step_needle(NeedleState.from_pose(np.eye(4)), NeedleCommand(1.0, 0.0), -0.1, NeedleParams())
    with pytest.raises(ControlError, match="spin_duty"):
        step_needles_batch(np.eye(4)[None], 1.0, 0.0, 2.0, dt_s=0.1, needle=NeedleParams())
    with pytest.raises(ControlError):
        NeedleParams(kappa_per_mm=0.0)
