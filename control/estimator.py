"""Error-state EKF on the needle tip: pose (with roll), curvature scale and EM bias.

State (nominal): ``R_world_from_tip`` (3x3), ``p_world_mm`` (3), curvature scale ``s`` (-), EM
static bias ``b_mm`` (3) and the deterministic torsion wind-up of the needle model.
Error state (10): ``[dp (3, world, mm), dtheta (3, tip/body frame, rad), ds, db (3, mm)]`` with
``R_true = R_est @ exp([dtheta]x)``, ``p_true = p_est + dp``.

* **Prediction** uses exactly the needle model of :mod:`needle_model` (constant-twist SE(3)
  exponential) with the estimated curvature scale and the commands actually sent.
* **Roll** is never measured (5-DOF sensor) but is observable through the motion: the
  insertion axis turns toward the tip's +y axis at rate ``kappa * s * (1 - duty) * v``, so the
  direction in which the measured axis turns reveals the roll and its rate reveals ``s``.
* **EM measurements** (position + axis) are fused at their acquisition stamp: the filter
  keeps its state at the latest fused stamp and the command log, and :meth:`TipEKF.estimate`
  predicts forward to "now". Out-of-order or late measurements (latency spikes, CBCT fixes
  that arrive after reconstruction) rewind to the snapshot before their stamp and replay the
  later measurements (bounded history).
* **CBCT fixes** (position only, 0.2 mm) make the EM bias observable.
* Innovation gating (chi-square on the normalised innovation) rejects outliers; the number
  of consecutive rejections is exposed so the safety monitor can stop on inconsistent data.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np

from needle_steering.control.geometry import FloatArray, check_pose, se3_exp_rows, skew, so3_exp
from needle_steering.control.needle_model import NeedleCommand, NeedleParams, _torsion_scalar
from needle_steering.control.sensors import CbctFix, EMMeasurement
from needle_steering.errors import ControlError

__all__ = ["EstimatorParams", "TipEKF", "TipEstimate"]

_POS = slice(0, 3)
_ROT = slice(3, 6)
_SCALE = 6
_BIAS = slice(7, 10)
_DIM = 10
_EZ = np.array([0.0, 0.0, 1.0])
_SKEW_EZ = skew(_EZ)


@dataclass(frozen=True)
class EstimatorParams:
    """Noise model and tuning of :class:`TipEKF` (units in the names).

    The ``*_per_sqrt_mm`` terms grow with inserted length, the ``*_per_sqrt_s`` terms with time.
    """

    em_position_sigma_mm: float = 0.5
    em_axis_sigma_rad: float = 0.01
    cbct_sigma_mm: float = 0.2
    initial_position_sigma_mm: float = 0.3
    initial_tilt_sigma_rad: float = 0.01
    initial_roll_sigma_rad: float = 0.3
    initial_curvature_scale_sigma: float = 0.2
    initial_bias_sigma_mm: float = 0.5
    position_noise_mm_per_sqrt_mm: float = 0.01
    position_noise_mm_per_sqrt_s: float = 0.005
    tilt_noise_rad_per_sqrt_mm: float = 0.0005
    roll_noise_rad_per_sqrt_s: float = 0.01
    roll_noise_per_rad_rotated: float = 0.05
    curvature_scale_noise_per_sqrt_mm: float = 0.004
    bias_noise_mm_per_sqrt_s: float = 0.0005
    gate_chi2: float = 30.0
    history_s: float = 3.0

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not math.isfinite(value) or value < 0:
                raise ControlError(f"EstimatorParams.{name} must be finite and >= 0, got {value!r}")
        for name in ("em_position_sigma_mm", "em_axis_sigma_rad", "cbct_sigma_mm", "gate_chi2"):
            if getattr(self, name) <= 0:
                raise ControlError(f"EstimatorParams.{name} must be > 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class TipEstimate:
    """Estimated tip state at ``stamp_s``.

    Attributes:
        stamp_s: time of the estimate (s).
        T_world_from_tip: shape (4, 4) estimated tip pose (mm).
        curvature_scale: estimated tissue curvature scale (-).
        bias_mm: shape (3,) estimated EM bias (mm).
        covariance: shape (10, 10) error-state covariance, order ``[dp, dtheta, ds, db]``.
    """

    stamp_s: float
    T_world_from_tip: FloatArray
    curvature_scale: float
    bias_mm: FloatArray
    covariance: FloatArray

    @property
    def position_mm(self) -> FloatArray:
        """Shape (3,) estimated tip position (mm)."""
        return self.T_world_from_tip[:3, 3]

    @property
    def position_cov_mm2(self) -> FloatArray:
        """Shape (3, 3) position covariance (mm^2)."""
        return self.covariance[_POS, _POS]

    @property
    def position_std_mm(self) -> float:
        """Largest per-axis position standard deviation (mm)."""
        return float(math.sqrt(max(self.covariance[0, 0], self.covariance[1, 1], self.covariance[2, 2])))

    @property
    def roll_std_rad(self) -> float:
        """Standard deviation of the roll error about the needle axis (rad)."""
        return float(math.sqrt(self.covariance[5, 5]))

    @property
    def curvature_scale_std(self) -> float:
        """Standard deviation of the curvature scale (-)."""
        return float(math.sqrt(self.covariance[_SCALE, _SCALE]))


_State = tuple[FloatArray, FloatArray, float, FloatArray, float]  # R, p, s, b, windup


class TipEKF:
    """Delayed-measurement error-state EKF (see module docstring).

    Args:
        T_world_from_tip0: shape (4, 4) initial pose estimate (mm), e.g. from robot kinematics.
        t0_s: time of the initial estimate (s).
        needle: needle model parameters (nominal curvature and torsion model).
        params: noise model.
        curvature_scale0: prior curvature scale.
        bias0_mm: prior EM bias (mm), zeros when omitted.
    """

    def __init__(
        self,
        T_world_from_tip0: FloatArray,
        t0_s: float,
        needle: NeedleParams,
        params: EstimatorParams | None = None,
        *,
        curvature_scale0: float = 1.0,
        bias0_mm: FloatArray | None = None,
    ) -> None:
        T0 = check_pose(T_world_from_tip0, "T_world_from_tip0")
        if not math.isfinite(t0_s):
            raise ControlError(f"t0_s must be finite, got {t0_s!r}")
        if not (math.isfinite(curvature_scale0) and curvature_scale0 > 0):
            raise ControlError(f"curvature_scale0 must be > 0, got {curvature_scale0!r}")
        self.needle = needle
        self.params = params or EstimatorParams()
        pr = self.params
        b0 = np.zeros(3) if bias0_mm is None else np.asarray(bias0_mm, dtype=float)
        self._x: _State = (T0[:3, :3].copy(), T0[:3, 3].copy(), float(curvature_scale0), b0.copy(), 0.0)
        self._P = np.diag(
            [pr.initial_position_sigma_mm**2] * 3
            + [pr.initial_tilt_sigma_rad**2] * 2
            + [pr.initial_roll_sigma_rad**2]
            + [pr.initial_curvature_scale_sigma**2]
            + [pr.initial_bias_sigma_mm**2] * 3
        )
        self._t = float(t0_s)
        self._t0 = float(t0_s)
        self._cmd_t: list[float] = []
        self._cmd: list[tuple[float, float, float]] = []
        self._log: list[tuple[float, str, EMMeasurement | CbctFix]] = []
        self._snaps: list[tuple[float, _State, FloatArray]] = []
        self._R_em = np.diag([pr.em_position_sigma_mm**2] * 3 + [pr.em_axis_sigma_rad**2] * 3)
        self._R_cbct = np.eye(3) * pr.cbct_sigma_mm**2
        self._cache: tuple[float, int, TipEstimate] | None = None
        self._version = 0
        self.last_em_stamp_s = float(t0_s)
        self.consecutive_rejections = 0
        self.rejected_total = 0
        self.accepted_total = 0
        self.discarded_too_old = 0
        self.cbct_fused = 0

    # ------------------------------------------------------------------ commands
    def apply_command(self, t_s: float, command: NeedleCommand) -> None:
        """Record that ``command`` is executed from ``t_s`` on (until the next command)."""
        if not math.isfinite(t_s):
            raise ControlError(f"t_s must be finite, got {t_s!r}")
        entry = (command.insertion_speed_mm_s, command.rotation_rate_rad_s, command.spin_duty)
        if self._cmd_t and t_s < self._cmd_t[-1] - 1e-12:
            raise ControlError(f"commands must be applied in time order: {t_s} < {self._cmd_t[-1]}")
        if self._cmd_t and abs(t_s - self._cmd_t[-1]) <= 1e-12:
            self._cmd[-1] = entry
        else:
            self._cmd_t.append(float(t_s))
            self._cmd.append(entry)
        self._version += 1

    # --------------------------------------------------------------- propagation
    def _step(
        self, x: _State, P: FloatArray | None, cmd: tuple[float, float, float], dt: float
    ) -> tuple[_State, FloatArray | None]:
        """One exact model step of the mean (and covariance when ``P`` is given)."""
        v, omega, duty = cmd
        R, p, s, b, windup = x
        nd = self.needle
        windup, droll = _torsion_scalar(windup, omega, dt, nd.torsion_time_constant_s, nd.torsion_deadband_rad)
        ds = v * dt
        k_eff = nd.kappa_per_mm * (1.0 - duty)
        phi_x = -k_eff * s * ds
        r = se3_exp_rows((0.0, 0.0, ds), (phi_x, 0.0, droll))
        dR = np.array([[r[0], r[1], r[2]], [r[3], r[4], r[5]], [r[6], r[7], r[8]]])
        dp = np.array([r[9], r[10], r[11]])
        R_new = R @ dR
        p_new = p + R @ dp
        if P is None:
            return (R_new, p_new, s, b, windup), None
        pr = self.params
        F = np.eye(_DIM)
        # d(p_new)/d(dtheta) = -R [dp]x
        F[_POS, _ROT] = -R @ np.array([[0.0, -dp[2], dp[1]], [dp[2], 0.0, -dp[0]], [-dp[1], dp[0], 0.0]])
        # phi = (-k_eff s ds, 0, droll), rho = (0, 0, ds): d(phi)/ds = (a, 0, 0) with a = -k_eff ds;
        # d(dp)/ds by a central difference of the closed-form exponential in phi_x.
        a = -k_eff * ds
        h = 1e-6
        rp = se3_exp_rows((0.0, 0.0, ds), (phi_x + h, 0.0, droll))
        rm = se3_exp_rows((0.0, 0.0, ds), (phi_x - h, 0.0, droll))
        g = a / (2.0 * h)
        F[_POS, _SCALE] = R @ np.array([(rp[9] - rm[9]) * g, (rp[10] - rm[10]) * g, (rp[11] - rm[11]) * g])
        F[_ROT, _ROT] = dR.T
        # d(dtheta_new)/ds = J_r(phi) (a, 0, 0): first column of the right Jacobian times a
        theta2 = phi_x * phi_x + droll * droll
        if theta2 < 1e-8:
            B = 0.5 - theta2 / 24.0
            C = 1.0 / 6.0 - theta2 / 120.0
        else:
            theta = math.sqrt(theta2)
            B = (1.0 - math.cos(theta)) / theta2
            C = (theta - math.sin(theta)) / (theta2 * theta)
        F[3, _SCALE] = a * (1.0 - C * droll * droll)
        F[4, _SCALE] = -a * B * droll
        F[5, _SCALE] = a * C * phi_x * droll
        P_new = F @ P @ F.T
        ads = abs(ds)
        q_pos = pr.position_noise_mm_per_sqrt_s**2 * dt + pr.position_noise_mm_per_sqrt_mm**2 * ads
        q_tilt = pr.tilt_noise_rad_per_sqrt_mm**2 * ads
        q_roll = pr.roll_noise_rad_per_sqrt_s**2 * dt + (pr.roll_noise_per_rad_rotated * droll) ** 2
        q_s = pr.curvature_scale_noise_per_sqrt_mm**2 * ads
        q_b = pr.bias_noise_mm_per_sqrt_s**2 * dt
        P_new.flat[:: _DIM + 1] += np.array((q_pos, q_pos, q_pos, q_tilt, q_tilt, q_roll, q_s, q_b, q_b, q_b))
        return (R_new, p_new, s, b, windup), P_new

    def _propagate(
        self, t_from: float, x: _State, P: FloatArray | None, t_to: float
    ) -> tuple[_State, FloatArray | None]:
        """Propagate through the piecewise-constant command log from ``t_from`` to ``t_to``."""
        if t_to <= t_from + 1e-12:
            return x, P
        k = bisect.bisect_right(self._cmd_t, t_from + 1e-12) - 1
        t = t_from
        n = len(self._cmd_t)
        while t < t_to - 1e-12:
            seg_end = self._cmd_t[k + 1] if k + 1 < n else math.inf
            t_next = min(t_to, seg_end)
            dt = t_next - t
            if dt > 1e-12:
                x, P = self._step(x, P, self._cmd[k] if k >= 0 else (0.0, 0.0, 0.0), dt)
            t = t_next
            k += 1
        return x, P

    # -------------------------------------------------------------------- update
    @staticmethod
    def _inject(x: _State, delta: FloatArray) -> _State:
        R, p, s, b, windup = x
        return (
            R @ so3_exp(delta[_ROT]),
            p + delta[_POS],
            s + float(delta[_SCALE]),
            b + delta[_BIAS],
            windup,
        )

    def _fuse(self, x: _State, P: FloatArray, kind: str, z: EMMeasurement | CbctFix) -> tuple[_State, FloatArray, bool]:
        R, p, _s, b, _w = x
        if kind == "em":
            assert isinstance(z, EMMeasurement)
            y = np.concatenate([z.position_mm - (p + b), z.axis - R[:, 2]])
            H = np.zeros((6, _DIM))
            H[0:3, _POS] = np.eye(3)
            H[0:3, _BIAS] = np.eye(3)
            H[3:6, _ROT] = -R @ _SKEW_EZ
            Rm = self._R_em
        else:
            y = z.position_mm - p
            H = np.zeros((3, _DIM))
            H[:, _POS] = np.eye(3)
            Rm = self._R_cbct
        PHt = P @ H.T
        S = H @ PHt + Rm
        Sinv_y = np.linalg.solve(S, y)
        nis = float(y @ Sinv_y)
        if kind == "em" and nis > self.params.gate_chi2:
            return x, P, False
        K = np.linalg.solve(S, PHt.T).T
        delta = K @ y
        IKH = np.eye(_DIM) - K @ H
        P_new = IKH @ P @ IKH.T + K @ Rm @ K.T
        P_new = 0.5 * (P_new + P_new.T)
        return self._inject(x, delta), P_new, True

    def _process(self, stamp: float, kind: str, z: EMMeasurement | CbctFix, live: bool) -> bool:
        x, P = self._propagate(self._t, self._x, self._P, stamp)
        assert P is not None
        self._x, self._P, accepted = self._fuse(x, P, kind, z)
        self._t = max(self._t, stamp)
        if live and kind == "em":
            if accepted:
                self.consecutive_rejections = 0
                self.accepted_total += 1
            else:
                self.consecutive_rejections += 1
                self.rejected_total += 1
        return accepted

    def _add(self, stamp: float, kind: str, z: EMMeasurement | CbctFix) -> bool:
        self._version += 1
        if stamp >= self._t - 1e-12:
            self._snaps.append((self._t, self._x, self._P))
            self._log.append((stamp, kind, z))
            accepted = self._process(stamp, kind, z, live=True)
        else:
            oldest = self._snaps[0][0] if self._snaps else self._t
            if stamp < oldest or not self._snaps:
                self.discarded_too_old += 1
                return False
            i = bisect.bisect_right([e[0] for e in self._log], stamp)
            t_i, x_i, P_i = self._snaps[i]
            if stamp < t_i:
                self.discarded_too_old += 1
                return False
            self._t, self._x, self._P = t_i, x_i, P_i
            self._log.insert(i, (stamp, kind, z))
            del self._snaps[i:]
            accepted = False
            for j in range(i, len(self._log)):
                st, kd, zz = self._log[j]
                self._snaps.append((self._t, self._x, self._P))
                ok = self._process(st, kd, zz, live=(j == i))
                if j == i:
                    accepted = ok
        self._trim()
        return accepted

    def _trim(self) -> None:
        horizon = self._t - self.params.history_s
        drop = 0
        while drop < len(self._log) - 1 and self._log[drop][0] < horizon:
            drop += 1
        if drop:
            del self._log[:drop]
            del self._snaps[:drop]
        oldest = self._snaps[0][0] if self._snaps else self._t
        k = bisect.bisect_right(self._cmd_t, oldest) - 1
        if k > 0:
            del self._cmd_t[:k]
            del self._cmd[:k]

    def fuse_em(self, measurement: EMMeasurement) -> bool:
        """Fuse one EM measurement at its acquisition stamp.

        Returns:
            True when accepted, False when gated out as an outlier or too old to replay.
        """
        if not (
            math.isfinite(measurement.stamp_s)
            and np.all(np.isfinite(measurement.position_mm))
            and np.all(np.isfinite(measurement.axis))
        ):
            raise ControlError(f"non-finite EM measurement: {measurement!r}")
        if measurement.stamp_s < self._t0:
            raise ControlError(f"EM stamp {measurement.stamp_s} precedes the filter start {self._t0}")
        self.last_em_stamp_s = max(self.last_em_stamp_s, measurement.stamp_s)
        return self._add(measurement.stamp_s, "em", measurement)

    def fuse_cbct(self, fix: CbctFix) -> bool:
        """Fuse one CBCT position fix at its acquisition stamp (replaying later EM samples)."""
        if not (math.isfinite(fix.stamp_s) and np.all(np.isfinite(fix.position_mm))):
            raise ControlError(f"non-finite CBCT fix: {fix!r}")
        ok = self._add(fix.stamp_s, "cbct", fix)
        if ok:
            self.cbct_fused += 1
        return ok

    # ------------------------------------------------------------------ estimate
    def estimate(self, t_s: float) -> TipEstimate:
        """Estimated state at ``t_s`` (s), predicted forward from the latest fused stamp."""
        if not math.isfinite(t_s):
            raise ControlError(f"t_s must be finite, got {t_s!r}")
        if self._cache is not None and self._cache[0] == t_s and self._cache[1] == self._version:
            return self._cache[2]
        x, P = self._propagate(self._t, self._x, self._P, t_s)
        assert P is not None
        R, p, s, b, _w = x
        T = np.eye(4)
        T[:3, :3] = R
        T[:3, 3] = p
        est = TipEstimate(float(t_s), T, float(s), b.copy(), P)
        self._cache = (t_s, self._version, est)
        return est
