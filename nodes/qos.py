"""Explicit QoS profiles, one per kind of data (every topic in :mod:`interfaces` names one).

=================  ===========  ===============  =======  ===============================================
profile            reliability  durability       depth    used for
=================  ===========  ===============  =======  ===============================================
``latched``        reliable     transient-local  1        plan document, approvals, registration, meshes
``sensor``         best-effort  volatile         5        tracker pose, joint states, measured_cp, estimate
``command``        reliable     volatile         10       servo/move commands, e-stop, fault injection
``status``         reliable     transient-local  1        control status, operating state (last value)
``events``         reliable     volatile         100      interactive-marker update/feedback, results
=================  ===========  ===============  =======  ===============================================

Why: a late-joining controller must still receive the plan and the approvals (transient-local,
reliable); sensor streams must never queue stale samples behind fresh ones (best-effort, small
depth, like ``rclpy.qos.qos_profile_sensor_data``); an e-stop must not be dropped (reliable).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from rclpy.qos import QoSProfile

#: Profile names used in the interface table.
PROFILES: Final = ("latched", "sensor", "command", "status", "events")

_DESCRIPTIONS: Final = {
    "latched": "reliable, transient-local, keep last 1",
    "sensor": "best-effort, volatile, keep last 5 (sensor data)",
    "command": "reliable, volatile, keep last 10",
    "status": "reliable, transient-local, keep last 1",
    "events": "reliable, volatile, keep last 100",
}


def describe(profile: str) -> str:
    """One-line human description of a profile (for the interface document)."""
    if profile not in _DESCRIPTIONS:
        raise ValueError(f"unknown QoS profile {profile!r}; expected one of {list(PROFILES)}")
    return _DESCRIPTIONS[profile]


def qos(profile: str) -> QoSProfile:
    """The rclpy ``QoSProfile`` named ``profile`` (see the module table)."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    if profile in {"latched", "status"}:
        return QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=1,
            reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL,
        )
    if profile == "sensor":
        return QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=5,
            reliability=ReliabilityPolicy.BEST_EFFORT,
            durability=DurabilityPolicy.VOLATILE,
        )
    if profile == "command":
        return QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=10,
            reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.VOLATILE,
        )
    if profile == "events":
        return QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=100,
            reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.VOLATILE,
        )
    raise ValueError(f"unknown QoS profile {profile!r}; expected one of {list(PROFILES)}")


__all__ = ["PROFILES", "describe", "qos"]
