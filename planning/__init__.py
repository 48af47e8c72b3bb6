"""needle_steering.planning layer."""
