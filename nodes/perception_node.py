"""``perception_node``: segment the configured image and publish meshes (thin wrapper).

Service ``/perception/segment`` (``std_srvs/Trigger``) reads ``image_path`` (or generates the
phantom patient when it is empty), segments it through
:func:`needle_steering.nodes.core_adapters.segment` and publishes bone and critical-structure
meshes on ``/perception/meshes`` (frame ``patient``, metres) and the levels found on
``/perception/levels``. When a core API is missing the response is ``success=false`` with the
reason; nothing is faked.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from std_msgs.msg import String
from std_srvs.srv import Trigger

from needle_steering.errors import NeedleSteeringError
from needle_steering.nodes import core_adapters
from needle_steering.nodes.interfaces import PERCEPTION, current_values, declare_parameters
from needle_steering.nodes.markers import label_meshes
from needle_steering.nodes.ros_helpers import publisher, run_node

IFACE = PERCEPTION


class PerceptionNode(Node):
    """See module docstring."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(IFACE.name, **kwargs)
        declare_parameters(self, IFACE)
        self._busy = threading.Lock()
        self._pub_meshes = publisher(self, IFACE, "/perception/meshes")
        self._pub_levels = publisher(self, IFACE, "/perception/levels")
        self.create_service(
            Trigger, "/perception/segment", self._on_segment, callback_group=MutuallyExclusiveCallbackGroup()
        )

    def _on_segment(self, _request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        if not self._busy.acquire(blocking=False):
            response.success, response.message = False, "segmentation already running"
            return response
        try:
            response.success, response.message = self._segment()
        except NeedleSteeringError as exc:
            response.success, response.message = False, str(exc)
        except (OSError, MemoryError) as exc:
            response.success, response.message = False, f"{type(exc).__name__}: {exc}"
        finally:
            self._busy.release()
        self.get_logger().info(f"/perception/segment: success={response.success}: {response.message}")
        return response

    def _segment(self) -> tuple[bool, str]:
        from needle_steering.perception.labels import CRITICAL_STRUCTURES, VERTEBRA_NAMES

        p = current_values(self, IFACE)
        core_adapters.require_segmentation()  # fail fast, before a phantom or image is loaded
        patient = core_adapters.load_patient(
            p["image_path"], p["modality"], p["phantom_seed"], p["phantom_levels"], p["phantom_spacing_mm"]
        )
        modality = p["modality"] if p["modality"] != "auto" else str(patient.meta.get("modality", "ct"))
        seg = core_adapters.segment(patient.ct, p["backend"], p["device"], modality)
        names = sorted(VERTEBRA_NAMES.items()) + sorted(CRITICAL_STRUCTURES.items())
        stamp = self.get_clock().now().to_msg()
        meshes = label_meshes(seg.labels, names, int(p["mesh_step_voxels"]), stamp)
        if p["output_dir"]:
            from needle_steering.perception.io import write_volume

            out = Path(p["output_dir"]).expanduser()
            out.mkdir(parents=True, exist_ok=True)
            write_volume(seg.labels, out / "labels.nii.gz")
        structures = sorted({m.text for m in meshes.markers})
        self._pub_meshes.publish(meshes)
        self._pub_levels.publish(
            String(
                data=json.dumps(
                    {
                        "levels": list(seg.levels),
                        "structures": structures,
                        "source": patient.source,
                        "backend": seg.backend,
                    }
                )
            )
        )
        return True, f"levels found: {', '.join(seg.levels) or 'none'} ({patient.source}, backend {seg.backend})"


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``perception_node``."""
    return run_node(PerceptionNode, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
