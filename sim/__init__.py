"""needle_steering.sim layer."""
