"""How many variable writes a graph under construction holds so far.

The bijector cache (`fresh_bijector`) reuses a value computed earlier in the same graph only if
no variable has been written since: a training step traced into one `tf.function` (a gradient
step between two `log_prob`s of the same tensor) must not see values from before the step. A
write is an op that assigns to a resource variable (Keras 3 optimizers emit `Assign*VariableOp`,
TF's fused optimizers `ResourceApply*`), directly or inside a called function.
"""

import weakref

import tensorflow as tf

__all__ = ["variable_writes"]

_WRITE_OPS = frozenset(
    {"AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp", "ResourceStridedSliceAssign"}
)
_WRITE_OP_PREFIXES = ("ResourceApply", "ResourceSparseApply", "ResourceScatter")
_CALL_OPS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})

# Per graph: (operations scanned, writes among them); the scan resumes where it stopped.
_SCANNED: "weakref.WeakKeyDictionary[tf.Graph, tuple[int, int]]" = weakref.WeakKeyDictionary()
# Per graph: whether each library function it called writes (blocks of a kind share one).
_FUNCTIONS: "weakref.WeakKeyDictionary[tf.Graph, dict[str, bool]]" = weakref.WeakKeyDictionary()


def _is_write(op_type: str) -> bool:
    return op_type in _WRITE_OPS or op_type.startswith(_WRITE_OP_PREFIXES)


def _function_writes(graph: tf.Graph, name: str, seen: set[str]) -> bool:
    """Whether the library function `name` (or one it calls) writes a variable."""
    if name in seen:
        return False
    seen.add(name)
    function = graph._get_function(name)  # noqa: SLF001  (the only lookup by name TF offers)
    if function is None:
        return True  # unknown: assume it writes, so the cache is never stale
    for node in function.cached_definition.node_def:
        if _is_write(node.op):
            return True
        called = node.attr["f"].func.name if "f" in node.attr else ""
        if node.op in _CALL_OPS and called and _function_writes(graph, called, seen):
            return True
    return False


def _op_writes(op: tf.Operation) -> bool:
    if _is_write(op.type):
        return True
    if op.type in _CALL_OPS:
        known = _FUNCTIONS.setdefault(op.graph, {})
        name = op.get_attr("f").name
        if name not in known:
            known[name] = _function_writes(op.graph, name, set())
        return known[name]
    return False


def variable_writes(graph: tf.Graph) -> int:
    """The number of ops of `graph` so far that write a variable (directly or in a call)."""
    operations = graph.get_operations()
    scanned, writes = _SCANNED.get(graph, (0, 0))
    writes += sum(_op_writes(op) for op in operations[scanned:])
    _SCANNED[graph] = (len(operations), writes)
    return writes
