"""Synthetic spine patients: deterministic CT/CBCT phantoms with exact labels and ground truth.

>>> from needle_steering.sim.phantom import PhantomConfig, generate_phantom
>>> phantom = generate_phantom(PhantomConfig(seed=3, spacing_mm=2.0))  # doctest: +SKIP
"""

from __future__ import annotations

from needle_steering.sim.phantom.config import Phantom, PhantomConfig, PhantomConfigError
from needle_steering.sim.phantom.generator import generate_phantom, write_phantom

__all__ = ["Phantom", "PhantomConfig", "PhantomConfigError", "generate_phantom", "write_phantom"]
