"""Exceptions raised at the boundaries of needle_steering.

Each carries a message that names the offending input and value, so the command line can print
it as one line and a node can return it as a service response.
"""

from __future__ import annotations


class NeedleSteeringError(Exception):
    """Base class of every error this project raises on purpose."""


class ImageError(NeedleSteeringError, ValueError):
    """An image file or folder cannot be read, or its content is not a usable volume."""


class GeometryError(NeedleSteeringError, ValueError):
    """Spacing, origin, direction or grid of a volume is invalid or does not match."""


class LabelError(NeedleSteeringError, ValueError):
    """A label map is empty, on the wrong grid, or holds unknown ids."""


class SegmentationError(NeedleSteeringError, ValueError):
    """Segmentation could not produce a trustworthy result."""


class RegistrationError(NeedleSteeringError, ValueError):
    """Registration failed or its fit is too poor to trust."""


class PlanningError(NeedleSteeringError, ValueError):
    """No safe plan exists for the request, or the request is invalid."""


class PlanDocumentError(NeedleSteeringError, ValueError):
    """A plan document fails validation (schema, numbers, hash)."""


class ControlError(NeedleSteeringError, ValueError):
    """Invalid control input or state."""


class SimulationError(NeedleSteeringError, RuntimeError):
    """The simulation cannot run the requested scenario."""
