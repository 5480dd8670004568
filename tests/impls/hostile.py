"""Gradient functions that do not return: each must get a 'crash' verdict (exit 1), never exit 0 or hang."""

import os
import sys
import time

import manual_bp as bp


def exits_0(spec, params, x, y):
    sys.exit(0)


def os_exits_0(spec, params, x, y):
    os._exit(0)


def sleeps_forever(spec, params, x, y):
    while True:
        time.sleep(3600)


def segfaults(spec, params, x, y):
    import ctypes

    return ctypes.string_at(0)


def _inner_helper(value):
    return 1 / value


def raises_deep(spec, params, x, y):
    return _inner_helper(0)


def prints_a_fake_verdict(spec, params, x, y):
    print("gradients match torch.autograd")
    r = bp.gradients(spec, params, x, y)
    return r.loss, {**r.grads, "layers.0.weight": 3 * r.grads["layers.0.weight"]}


def exits_on_deep_nets(spec, params, x, y):
    """Correct on one- and two-layer nets, sys.exit(0) on deeper ones: fuzz must shrink to 3 layers."""
    if len(spec.layers) > 2:
        sys.exit(0)
    r = bp.gradients(spec, params, x, y)
    return r.loss, r.grads


def returns_a_list(spec, params, x, y):
    r = bp.gradients(spec, params, x, y)
    return r.loss, {**r.grads, "layers.0.weight": r.grads["layers.0.weight"].tolist()}


def returns_a_string(spec, params, x, y):
    return "no"
