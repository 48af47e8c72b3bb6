"""Patient anatomy for the twin: label map -> triangle meshes, and signed distance fields.

Meshes: :func:`label_meshes` runs marching cubes (``skimage.measure.marching_cubes``, with the
voxel spacing) on each structure's mask, maps the vertices to LPS millimetres with the volume's
origin and direction, and simplifies each surface with Open3D's quadric decimation to a few
thousand triangles. The twin loads them as static concave collision bodies.

Distances: :class:`SignedDistanceField` is a Euclidean distance transform of one structure's
mask (positive inside, negative outside, mm), sampled with trilinear interpolation. It measures
cortical breaches of pedicle screws and the agreement of meshes with their label map
(:func:`mesh_surface_distance_mm`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from needle_steering.errors import SimulationError
from needle_steering.perception import labels as label_ids
from needle_steering.perception.volume import Volume
from needle_steering.sim.twin.frames import FloatArray, check_points

#: Default number of triangles each structure is simplified to.
DEFAULT_TARGET_TRIANGLES = 3000
#: PyBullet's limit on vertices of one mesh shape (Linux build).
PYBULLET_MAX_VERTICES = 131072


@dataclass(frozen=True)
class AnatomyMesh:
    """A closed triangle surface of one labelled structure.

    Attributes:
        name: Structure name (``"L3"``, ``"spinal_canal"``, ...).
        label_id: Label id in the label map.
        kind: ``"bone"`` (vertebra), ``"critical"`` (canal, vessels) or ``"other"``.
        vertices_lps_mm: Vertices, shape ``(V, 3)``, LPS mm.
        triangles: Vertex indices, shape ``(F, 3)``, int32.
    """

    name: str
    label_id: int
    kind: str
    vertices_lps_mm: FloatArray
    triangles: NDArray[np.int32]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        v = check_points(self.vertices_lps_mm, f"mesh {self.name}: vertices_lps_mm")
        t = np.asarray(self.triangles)
        if v.ndim != 2 or len(v) < 4:
            raise SimulationError(f"mesh {self.name}: needs >= 4 vertices, got shape {v.shape}")
        if t.ndim != 2 or t.shape[1] != 3 or len(t) < 4 or t.min() < 0 or t.max() >= len(v):
            raise SimulationError(f"mesh {self.name}: invalid triangle indices, shape {t.shape}")
        if len(v) > PYBULLET_MAX_VERTICES:
            raise SimulationError(f"mesh {self.name}: {len(v)} vertices exceed PyBullet's {PYBULLET_MAX_VERTICES}")
        object.__setattr__(self, "vertices_lps_mm", v)
        object.__setattr__(self, "triangles", t.astype(np.int32))

    @property
    def n_triangles(self) -> int:
        """Number of triangles."""
        return len(self.triangles)


def structure_name(label_id: int) -> tuple[str, str]:
    """``(name, kind)`` of a label id: vertebrae are bone, canal/aorta/IVC critical, the rest other."""
    lid = int(label_id)
    if label_ids.is_vertebra(lid):
        return label_ids.level_name(lid), "bone"
    if lid in label_ids.CRITICAL_STRUCTURES:
        return label_ids.CRITICAL_STRUCTURES[lid], "critical"
    if lid in label_ids.OTHER_STRUCTURES:
        return label_ids.OTHER_STRUCTURES[lid], "other"
    return f"label_{lid}", "other"


def _crop_box(mask: NDArray[np.bool_], pad: int) -> tuple[slice, slice, slice]:
    idx = np.nonzero(mask)
    lo = [max(0, int(a.min()) - pad) for a in idx]
    hi = [min(n, int(a.max()) + pad + 1) for a, n in zip(idx, mask.shape, strict=True)]
    return slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2])


def mesh_from_mask(
    labels: Volume,
    mask: NDArray[np.bool_],
    name: str,
    label_id: int,
    kind: str,
    *,
    target_triangles: int = DEFAULT_TARGET_TRIANGLES,
    smoothing_sigma_voxels: float = 0.5,
) -> AnatomyMesh:
    """Marching cubes + quadric decimation of one binary mask on ``labels``' grid.

    Args:
        labels: The grid (spacing, origin, direction) the mask lives on.
        mask: Boolean array with ``labels.shape``.
        name, label_id, kind: Identity of the structure.
        target_triangles: Triangle budget after simplification (>= 100).
        smoothing_sigma_voxels: Gaussian smoothing of the mask before marching cubes (voxels; 0
            for none). A mild blur removes the voxel staircase without moving the 0.5 level.

    Returns:
        The simplified closed surface in LPS mm.

    Raises:
        SimulationError: Empty mask, wrong shape or a surface that cannot be extracted.
    """
    import open3d as o3d
    from scipy import ndimage
    from skimage import measure

    m = np.asarray(mask, dtype=bool)
    if m.shape != labels.shape:
        raise SimulationError(f"mask shape {m.shape} does not match the label grid {labels.shape}")
    if not m.any():
        raise SimulationError(f"structure {name!r} (label {label_id}) is empty in the label map")
    if target_triangles < 100:
        raise SimulationError(f"target_triangles must be >= 100, got {target_triangles!r}")
    pad = 2 + math.ceil(3 * smoothing_sigma_voxels)
    box = _crop_box(m, pad)
    # Pad with zeros so the surface closes at the volume border.
    sub = np.pad(m[box].astype(np.float32), 1)
    if smoothing_sigma_voxels > 0:
        sub = ndimage.gaussian_filter(sub, smoothing_sigma_voxels)
    spacing = tuple(float(s) for s in labels.spacing_mm)
    try:
        verts_scaled, faces, _normals, _values = measure.marching_cubes(sub, level=0.5, spacing=spacing)
    except (ValueError, RuntimeError) as exc:
        raise SimulationError(f"marching cubes failed for {name!r}: {exc}") from None
    offset_ijk = np.array([box[0].start - 1, box[1].start - 1, box[2].start - 1], dtype=np.float64)
    ijk = verts_scaled / labels.spacing_mm + offset_ijk
    verts_lps = labels.index_to_lps(ijk)
    mesh = o3d.geometry.TriangleMesh(
        o3d.utility.Vector3dVector(verts_lps), o3d.utility.Vector3iVector(np.asarray(faces, dtype=np.int32))
    )
    mesh.remove_duplicated_vertices()
    mesh.remove_degenerate_triangles()
    n_before = len(mesh.triangles)
    if n_before > target_triangles:
        mesh = mesh.simplify_quadric_decimation(target_number_of_triangles=int(target_triangles))
        mesh.remove_degenerate_triangles()
        mesh.remove_duplicated_triangles()
        mesh.remove_unreferenced_vertices()
    v = np.asarray(mesh.vertices, dtype=np.float64)
    t = np.asarray(mesh.triangles, dtype=np.int32)
    return AnatomyMesh(
        name, int(label_id), kind, v, t,
        {"triangles_before_simplification": int(n_before), "voxels": int(m.sum())},
    )


def label_meshes(
    labels: Volume,
    label_id_list: Iterable[int] | None = None,
    target_triangles: int = DEFAULT_TARGET_TRIANGLES,
    smoothing_sigma_voxels: float = 0.5,
    min_voxels: int = 20,
) -> list[AnatomyMesh]:
    """Meshes of the structures in a label map.

    Args:
        labels: Integer label map (LPS mm grid).
        label_id_list: Ids to mesh; all vertebrae and critical structures present when None
            (skin and other large shells are left out: the needle passes through them).
        target_triangles: Triangle budget per structure.
        smoothing_sigma_voxels: Mask smoothing before marching cubes (voxels).
        min_voxels: Structures with fewer voxels are skipped (noise).

    Returns:
        One :class:`AnatomyMesh` per structure, in ascending label order.
    """
    arr = np.asarray(labels.array)
    if arr.dtype.kind not in "iu":
        raise SimulationError(f"label map must hold integers, got dtype {arr.dtype}")
    present, counts = np.unique(arr, return_counts=True)
    count_of = dict(zip(present.tolist(), counts.tolist(), strict=True))
    if label_id_list is None:
        wanted = [
            int(i) for i in present.tolist()
            if label_ids.is_vertebra(int(i)) or int(i) in label_ids.CRITICAL_STRUCTURES
        ]
    else:
        wanted = sorted({int(i) for i in label_id_list})
        missing = [i for i in wanted if i not in count_of]
        if missing:
            raise SimulationError(f"label ids {missing} are not in the label map (present: {present.tolist()})")
    meshes = []
    for lid in wanted:
        if lid == 0 or count_of.get(lid, 0) < min_voxels:
            continue
        name, kind = structure_name(lid)
        meshes.append(mesh_from_mask(labels, arr == lid, name, lid, kind, target_triangles=target_triangles,
                                     smoothing_sigma_voxels=smoothing_sigma_voxels))
    return meshes


class SignedDistanceField:
    """Signed distance (mm) to the surface of one structure, positive inside, on a cropped grid.

    The distance is the exact Euclidean distance transform of the voxel mask (spacing-aware)
    shifted by half a voxel so that the zero level lies on the voxel faces between inside and
    outside voxels, not on the voxel centres. Outside the cropped box (``pad_mm`` around the
    structure) values are clamped to the box border: distances there are at least ``pad_mm``.

    Args:
        labels: Label map.
        mask: Boolean mask on ``labels``' grid.
        pad_mm: Margin kept around the structure (mm).
    """

    def __init__(self, labels: Volume, mask: NDArray[np.bool_], pad_mm: float = 15.0) -> None:
        from scipy import ndimage

        m = np.asarray(mask, dtype=bool)
        if m.shape != labels.shape:
            raise SimulationError(f"mask shape {m.shape} does not match the label grid {labels.shape}")
        if not m.any():
            raise SimulationError("cannot build a distance field of an empty mask")
        if not (math.isfinite(pad_mm) and pad_mm > 0):
            raise SimulationError(f"pad_mm must be > 0, got {pad_mm!r}")
        self.labels = labels
        pad = math.ceil(pad_mm / float(np.min(labels.spacing_mm))) + 1
        box = _crop_box(m, pad)
        # One layer of "outside" around the crop: a structure cut by the volume border ends there.
        sub = np.pad(m[box], 1)
        sp = labels.spacing_mm
        inside = ndimage.distance_transform_edt(sub, sampling=sp)
        outside = ndimage.distance_transform_edt(~sub, sampling=sp)
        half = 0.5 * float(np.mean(sp))
        self.sdf_mm: FloatArray = np.where(sub, inside - half, -(outside - half)).astype(np.float64)
        self.offset_ijk = np.array([box[0].start - 1, box[1].start - 1, box[2].start - 1], dtype=np.float64)

    def __call__(self, points_lps_mm: ArrayLike) -> FloatArray:
        """Signed distance (mm, positive inside) at LPS points ``(..., 3)``; shape ``(...)``."""
        from scipy import ndimage

        pts = check_points(points_lps_mm, "points_lps_mm")
        ijk = self.labels.lps_to_index(pts.reshape(-1, 3)) - self.offset_ijk
        vals = ndimage.map_coordinates(self.sdf_mm, ijk.T, order=1, mode="nearest")
        return np.asarray(vals, dtype=np.float64).reshape(pts.shape[:-1])


def _sample_mesh_points(mesh: AnatomyMesh, n_points: int, rng: np.random.Generator) -> FloatArray:
    v, t = mesh.vertices_lps_mm, mesh.triangles
    a, b, c = v[t[:, 0]], v[t[:, 1]], v[t[:, 2]]
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    prob = area / area.sum()
    tri = rng.choice(len(t), size=n_points, p=prob)
    r1 = np.sqrt(rng.random(n_points))
    r2 = rng.random(n_points)
    return (1 - r1)[:, None] * a[tri] + (r1 * (1 - r2))[:, None] * b[tri] + (r1 * r2)[:, None] * c[tri]


def _label_surface_points(labels: Volume, mask: NDArray[np.bool_]) -> FloatArray:
    """LPS mm centres of the voxel faces between the mask and its complement."""
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    pts: list[FloatArray] = []
    for axis in range(3):
        a = np.take(m, np.arange(m.shape[axis] - 1), axis=axis)
        b = np.take(m, np.arange(1, m.shape[axis]), axis=axis)
        idx = np.argwhere(a != b).astype(np.float64)
        idx[:, axis] += 0.5
        pts.append(idx - 1.0)  # undo the padding
    ijk = np.concatenate(pts, axis=0)
    return labels.index_to_lps(ijk)


def mesh_surface_distance_mm(
    mesh: AnatomyMesh,
    labels: Volume,
    label_id: int | None = None,
    n_points: int = 20000,
    seed: int = 0,
) -> dict[str, float]:
    """Symmetric surface distance between a mesh and its structure in the label map.

    Mesh -> labels: ``|SDF|`` at points sampled uniformly on the triangles. Labels -> mesh:
    distance from the voxel-face centres of the label boundary to the triangle surface
    (Open3D ``RaycastingScene``).

    Returns:
        ``{"mean_mm", "p95_mm", "max_mm", "mesh_to_label_mean_mm", "label_to_mesh_mean_mm"}``.
    """
    import open3d as o3d

    lid = mesh.label_id if label_id is None else int(label_id)
    mask = np.asarray(labels.array) == lid
    sdf = SignedDistanceField(labels, mask, pad_mm=5.0)
    rng = np.random.default_rng(seed)
    on_mesh = _sample_mesh_points(mesh, n_points, rng)
    d_mesh = np.abs(sdf(on_mesh))
    surf = _label_surface_points(labels, mask)
    if len(surf) > n_points:
        surf = surf[rng.choice(len(surf), size=n_points, replace=False)]
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(
        o3d.core.Tensor.from_numpy(np.ascontiguousarray(mesh.vertices_lps_mm, dtype=np.float32)),
        o3d.core.Tensor.from_numpy(np.ascontiguousarray(mesh.triangles, dtype=np.uint32)),
    )
    query = o3d.core.Tensor.from_numpy(np.ascontiguousarray(surf, dtype=np.float32))
    d_label = scene.compute_distance(query).numpy().astype(np.float64)
    both = np.concatenate([d_mesh, d_label])
    return {
        "mean_mm": float(both.mean()),
        "p95_mm": float(np.percentile(both, 95)),
        "max_mm": float(both.max()),
        "mesh_to_label_mean_mm": float(d_mesh.mean()),
        "label_to_mesh_mean_mm": float(d_label.mean()),
    }


def bone_mask(labels: Volume, levels: Sequence[str] | None = None) -> NDArray[np.bool_]:
    """Mask of the vertebrae (all, or the named ``levels``) in the label map."""
    arr = np.asarray(labels.array)
    if levels:
        ids = [label_ids.level_id(name) for name in levels]
        return np.isin(arr, ids)
    ids = sorted(label_ids.VERTEBRA_NAMES)
    return np.isin(arr, ids)


__all__ = [
    "DEFAULT_TARGET_TRIANGLES",
    "AnatomyMesh",
    "SignedDistanceField",
    "bone_mask",
    "label_meshes",
    "mesh_from_mask",
    "mesh_surface_distance_mm",
    "structure_name",
]
