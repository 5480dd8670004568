"""Imported by cand.py as a plain sibling module."""

import manual_bp as bp


def correct(spec, params, x, y):
    r = bp.gradients(spec, params, x, y)
    return r.loss, r.grads, r.deltas
