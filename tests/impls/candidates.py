"""Gradient functions for the command-line tests: one correct, the rest wrong in one way each."""

import numpy as np

import manual_bp as bp

NOT_A_FUNCTION = 42


def correct(spec, params, x, y):
    r = bp.gradients(spec, params, x, y)
    return r.loss, r.grads, r.deltas


def doubled_first_weight(spec, params, x, y):
    r = bp.gradients(spec, params, x, y)
    return r.loss, {**r.grads, "layers.0.weight": 2 * r.grads["layers.0.weight"]}


def raises(spec, params, x, y):
    raise ZeroDivisionError("my bug")


def wrong_keys(spec, params, x, y):
    r = bp.gradients(spec, params, x, y)
    return r.loss, {"W1": r.grads["layers.0.weight"]}


def wrong_shape(spec, params, x, y):
    r = bp.gradients(spec, params, x, y)
    return r.loss, {k: v.reshape(-1) for k, v in r.grads.items()}


def wrong_dtype(spec, params, x, y):
    r = bp.gradients(spec, params, x, y)
    return r.loss, {k: v.astype(np.float32) for k, v in r.grads.items()}
