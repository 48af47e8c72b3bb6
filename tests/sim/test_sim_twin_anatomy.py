"""Anatomy meshes from a label map: geometry matches the labels and loads into PyBullet."""

from __future__ import annotations

import numpy as np
import pytest

from needle_steering.errors import SimulationError
from needle_steering.perception.labels import SPINAL_CANAL, level_id
from needle_steering.perception.volume import Volume
from needle_steering.sim.twin.anatomy import SignedDistanceField, label_meshes, mesh_surface_distance_mm
from needle_steering.sim.twin.frames import prone_T_robot_from_patient_m
from needle_steering.sim.twin.twin import Twin

L3 = level_id("L3")


@pytest.fixture(scope="module")
def labels() -> Volume:
    """An anisotropic, flipped-axis grid with an ellipsoidal 'vertebra' and a tube 'canal'."""
    shape, spacing = (90, 80, 50), (0.8, 0.9, 1.5)
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    x, y, z = i * spacing[0], j * spacing[1], k * spacing[2]
    arr = np.zeros(shape, np.uint8)
    arr[((x - 36) / 22) ** 2 + ((y - 30) / 15) ** 2 + ((z - 37) / 25) ** 2 < 1] = L3
    arr[(x - 36) ** 2 + (y - 60) ** 2 < 30] = SPINAL_CANAL
    direction = np.array([[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]])  # RAI-like axes
    return Volume(arr, spacing, (12.0, 25.0, -40.0), direction)


def test_meshes_match_the_label_map(labels: Volume) -> None:
    meshes = label_meshes(labels, target_triangles=1500)
    assert [m.name for m in meshes] == ["L3", "spinal_canal"]
    assert [m.kind for m in meshes] == ["bone", "critical"]
    for mesh in meshes:
        assert 1000 <= mesh.n_triangles <= 1500
        dist = mesh_surface_distance_mm(mesh, labels, n_points=5000)
        # Sub-voxel agreement after simplification (the finest spacing is 0.8 mm).
        assert dist["mean_mm"] < 0.25, dist
        assert dist["p95_mm"] < 0.6, dist
        assert dist["max_mm"] < 1.5, dist
    # Vertices live in LPS mm on the flipped grid: the bounding box matches the labelled voxels.
    bone = meshes[0]
    vox = labels.index_to_lps(np.argwhere(labels.array == L3))
    np.testing.assert_allclose(bone.vertices_lps_mm.min(axis=0), vox.min(axis=0), atol=1.2)
    np.testing.assert_allclose(bone.vertices_lps_mm.max(axis=0), vox.max(axis=0), atol=1.2)


def test_a_mesh_from_the_wrong_grid_is_detected(labels: Volume) -> None:
    mesh = label_meshes(labels, [L3], target_triangles=800)[0]
    shifted = Volume(labels.array, labels.spacing_mm, labels.origin_lps_mm + np.array([2.0, 0.0, 0.0]),
                     labels.direction)
    assert mesh_surface_distance_mm(mesh, shifted, n_points=3000)["mean_mm"] > 0.8


def test_signed_distance_field_sign_and_scale(labels: Volume) -> None:
    sdf = SignedDistanceField(labels, labels.array == L3)
    centre = labels.index_to_lps(np.argwhere(labels.array == L3).mean(axis=0))
    assert sdf(centre[None])[0] == pytest.approx(15.0, abs=1.0)  # semi-axis 15 mm along j
    far = labels.index_to_lps(np.array([[0.0, 0.0, 0.0]]))
    assert sdf(far)[0] < -5.0
    with pytest.raises(SimulationError, match="empty"):
        SignedDistanceField(labels, np.zeros(labels.shape, bool))


def test_meshes_become_pybullet_collision_bodies(labels: Volume) -> None:
    meshes = label_meshes(labels, target_triangles=1500)
    bone = meshes[0]
    centre = bone.vertices_lps_mm.mean(axis=0)
    T = prone_T_robot_from_patient_m(centre, (0.6, 0.0, 0.25))
    with Twin() as twin:
        bodies = twin.add_anatomy(meshes)
        twin.set_patient(T)
        assert set(bodies) == {"L3", "spinal_canal"}
        # A needle whose tip sits on the bone surface touches it; 5 mm outside it does not.
        surface_pt = bone.vertices_lps_mm[np.argmax(bone.vertices_lps_mm[:, 1])]  # most posterior vertex
        pose = np.eye(4)
        pose[:3, :3] = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]])
        pose[:3, 3] = surface_pt
        twin.set_needle(surface_pt[None, :], pose)
        assert twin.needle_contact(("bone",)).in_contact
        pose[:3, 3] = surface_pt + np.array([0.0, 5.0, 0.0])
        twin.set_needle(pose[None, :3, 3], pose)
        rep = twin.needle_contact(("bone",))
        assert not rep.in_contact
        assert rep.clearance_mm == pytest.approx(5.0 - twin.config.needle_radius_mm, abs=0.5)
        # Moving the patient moves the meshes with it.
        twin.set_patient_shift([0.0, 4.0, 0.0])
        assert twin.needle_contact(("bone",)).clearance_mm < 1.0
