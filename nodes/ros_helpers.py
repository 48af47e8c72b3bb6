"""Small rclpy helpers shared by the nodes: table-driven publishers/subscriptions, guarded
callbacks and the standard ``main``."""

from __future__ import annotations

import functools
import importlib
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from needle_steering.nodes.interfaces import NodeInterface, topic_qos

if TYPE_CHECKING:
    from rclpy.callback_groups import CallbackGroup
    from rclpy.node import Node
    from rclpy.publisher import Publisher
    from rclpy.subscription import Subscription

F = TypeVar("F", bound=Callable[..., Any])


def msg_class(type_name: str) -> Any:
    """Import a message/service class from ``"pkg/msg/Name"`` or ``"pkg/srv/Name"``."""
    pkg, kind, name = type_name.split("/")
    return getattr(importlib.import_module(f"{pkg}.{kind}"), name)


def publisher(node: Node, iface: NodeInterface, name: str, topic_name: str | None = None) -> Publisher:
    """Publisher for the table topic ``name`` with its message type and QoS."""
    topic = iface.topic(name)
    if topic.direction != "pub":
        raise ValueError(f"{iface.name} does not publish {name}")
    return node.create_publisher(msg_class(topic.msg_type), topic_name or topic.name, topic_qos(topic))


def subscription(
    node: Node,
    iface: NodeInterface,
    name: str,
    callback: Callable[[Any], None],
    group: CallbackGroup | None = None,
) -> Subscription:
    """Subscription to the table topic ``name`` with its message type and QoS."""
    topic = iface.topic(name)
    if topic.direction != "sub":
        raise ValueError(f"{iface.name} does not subscribe to {name}")
    return node.create_subscription(
        msg_class(topic.msg_type), topic.name, callback, topic_qos(topic), callback_group=group
    )


def guarded(func: F) -> F:
    """Decorate a node callback so an unexpected exception is logged instead of killing the node.

    Expected refusals are handled inside the callbacks with their reasons; this is the last line
    that keeps a node alive (and says so in its log) if something unforeseen slips through.
    """

    @functools.wraps(func)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return func(self, *args, **kwargs)
        except Exception as exc:
            self.get_logger().error(f"{func.__name__} failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            return None

    return wrapper  # type: ignore[return-value]


def parse_json_object(text: str, source: str) -> dict[str, Any]:
    """Parse a JSON object from a topic; raises ``ValueError`` naming the source and the problem."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: malformed JSON ({exc.msg} at column {exc.colno}): {text[:80]!r}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
    return data


def run_node(factory: Callable[[], Node], argv: Sequence[str] | None = None, *, multi_threaded: bool = True) -> int:
    """Standard ``main``: init rclpy with ``argv``, spin one node, shut down cleanly.

    ``multi_threaded=False`` suits a node whose callbacks all share one mutually exclusive group:
    a multi-threaded executor gives it no concurrency, and while the group is busy its ready
    subscriptions keep the dispatcher spinning, which takes CPU from the busy callback itself.
    """
    import faulthandler
    import signal

    import rclpy
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor, SingleThreadedExecutor

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # bringup asks for the stacks of a hung node

    rclpy.init(args=list(argv) if argv is not None else sys.argv)
    node: Node | None = None
    executor: MultiThreadedExecutor | SingleThreadedExecutor | None = None
    try:
        node = factory()
        executor = MultiThreadedExecutor() if multi_threaded else SingleThreadedExecutor()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError:
        # rclpy race at SIGINT: the executor takes a message from a subscription whose context the
        # signal handler has just shut down ("Unable to convert call argument", seen in CI). Only
        # an error raised after shutdown began is that race; anything else is a crash.
        if rclpy.ok():
            raise
    finally:
        if executor is not None:
            # The executor still holds the node's handles after spin() is interrupted: destroy_node() would then
            # wait for them forever (a sim_node hang at SIGINT, seen in CI). Shut the executor down first.
            executor.shutdown(timeout_sec=5.0)
        if node is not None:
            close = getattr(node, "close", None)
            if callable(close):
                close()
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0


__all__ = ["guarded", "msg_class", "parse_json_object", "publisher", "run_node", "subscription"]
