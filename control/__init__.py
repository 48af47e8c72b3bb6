"""needle_steering.control layer."""
