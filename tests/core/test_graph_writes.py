"""`graph_writes.variable_writes`: the variable writes a graph under construction holds."""

import keras
import tensorflow as tf

from tfp_resflow.core.graph_writes import variable_writes


def writes_seen(body):
    """`variable_writes` of the default graph before and after `body()`, inside a trace."""
    seen = []

    @tf.function
    def traced():
        graph = tf.compat.v1.get_default_graph()
        seen.append(variable_writes(graph))
        body()
        seen.append(variable_writes(graph))
        seen.append(variable_writes(graph))  # a second look at the same ops counts nothing new

    traced()
    return seen


def test_reads_and_arithmetic_are_not_writes():
    v = tf.Variable(1.0)
    assert writes_seen(lambda: tf.sin(v.read_value()) * 2.0) == [0, 0, 0]


def test_assignments_and_optimizer_steps_are_writes():
    v = tf.Variable(1.0)
    assert writes_seen(lambda: v.assign_add(1.0)) == [0, 1, 1]
    w = keras.Variable(1.0)
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build([w])
    before, after, _ = writes_seen(lambda: optimizer.apply([tf.constant(1.0)], [w]))
    assert after > before


def test_writes_inside_called_functions_count():
    v = tf.Variable(1.0)

    @tf.function
    def inner():
        v.assign_sub(1.0)
        return v.read_value()

    @tf.function
    def reads_only():
        return v.read_value() + 1.0

    assert writes_seen(inner)[1] == 1
    assert writes_seen(reads_only)[1] == 0
