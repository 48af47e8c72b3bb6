"""needle_steering.nodes layer."""
