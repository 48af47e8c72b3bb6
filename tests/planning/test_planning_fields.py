"""Density calibration, signed distances and trilinear sampling."""

from __future__ import annotations

import numpy as np
import pytest

from needle_steering.errors import GeometryError, PlanningError
from needle_steering.planning.fields import (
    FAR_MM,
    DensityCalibration,
    FieldSet,
    LocalGrid,
    distance_to_mm,
    signed_distance_mm,
)


def test_default_calibration_and_fit() -> None:
    cal = DensityCalibration()
    assert cal.bmd_mg_cm3(100.0) == pytest.approx(80.0)
    assert cal.hu_of_bmd(cal.bmd_mg_cm3(np.array([0.0, 250.0]))) == pytest.approx([0.0, 250.0])
    fitted = DensityCalibration.fit([0.0, 100.0, 200.0], [5.0, 75.0, 145.0])
    assert fitted.slope_mg_cm3_per_hu == pytest.approx(0.7)
    assert fitted.intercept_mg_cm3 == pytest.approx(5.0)
    with pytest.raises(PlanningError, match="implausible"):
        DensityCalibration(slope_mg_cm3_per_hu=50.0)
    with pytest.raises(PlanningError, match=">= 2 paired"):
        DensityCalibration.fit([1.0], [2.0])
    with pytest.raises(PlanningError, match="different HU"):
        DensityCalibration.fit([10.0, 10.0], [1.0, 2.0])


def test_signed_distance_of_a_ball_matches_geometry() -> None:
    n = 41
    ijk = np.indices((n, n, n)).transpose(1, 2, 3, 0) - 20.0
    r = np.linalg.norm(ijk, axis=-1)
    ball = r <= 12.0
    sdf = signed_distance_mm(ball, 1.0)
    inside = (r < 10.0) & (r > 2.0)
    assert np.max(np.abs(sdf[inside] - (12.0 - r[inside]))) < 0.8
    outside = (r > 14.0) & (r < 18.0)
    assert np.max(np.abs(sdf[outside] + (r[outside] - 12.0))) < 0.8
    coarse = signed_distance_mm(ball, 1.0, coarse_outside=True)
    assert np.array_equal(coarse[ball], sdf[ball])
    assert np.all(coarse[~ball] < 0) and np.all(coarse[~ball] >= sdf[~ball] - 1e-6 - 2.0)
    assert np.all(signed_distance_mm(np.zeros((4, 4, 4), bool), 1.0) == -FAR_MM)
    d = distance_to_mm(ball, 0.5)
    assert d[20, 20, 20] < 0 and d[0, 0, 0] > 0
    assert np.all(distance_to_mm(np.zeros((3, 3, 3), bool), 1.0) == FAR_MM)


def test_trilinear_sampling_is_exact_on_linear_fields_in_rotated_grids() -> None:
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    grid = LocalGrid(np.array([10.0, -5.0, 3.0]), q, 0.8, (20, 25, 30))
    ijk = np.indices(grid.shape).transpose(1, 2, 3, 0).astype(float)
    lps = grid.index_to_lps(ijk)
    coef = np.array([0.3, -1.2, 2.0])
    field = (lps @ coef + 4.0).astype(np.float32)
    fs = FieldSet(grid, field, np.zeros(grid.shape, np.uint8))
    fs.add("lin", field, -99.0)
    pts = grid.index_to_lps(rng.uniform(1, 18, size=(500, 3)))
    assert np.allclose(fs.sample("lin", pts), pts @ coef + 4.0, atol=1e-3)
    assert np.allclose(grid.lps_to_index(grid.index_to_lps(ijk[3, 4, 5])), [3, 4, 5])
    far = grid.index_to_lps(np.array([[-50.0, 0, 0]]))
    assert fs.sample("lin", far)[0] == -99.0
    with pytest.raises(PlanningError, match="unknown field"):
        fs.sample("nope", pts)
    with pytest.raises(GeometryError, match="shape"):
        fs.add("bad", np.zeros((2, 2, 2), np.float32), 0.0)
    with pytest.raises(GeometryError, match="orthonormal"):
        LocalGrid(np.zeros(3), np.ones((3, 3)), 1.0, (2, 2, 2))
