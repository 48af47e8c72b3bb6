"""needle_steering: image-guided spine interventions on ROS 2 Jazzy.

Layers (installed as subpackages): ``perception`` (image I/O, segmentation, registration),
``planning`` (screw, biopsy and steerable-needle trajectories, the plan document), ``control``
(needle model, estimation, feedback, safety), ``sim`` (phantoms and the PyBullet twin) and
``nodes`` (thin rclpy wrappers).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
