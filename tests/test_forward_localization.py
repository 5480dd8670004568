"""A candidate that reports its own forward (z.<node>, a.<node>: a program run by exec: writes them) gets a forward
bug named layer by layer, instead of only "the loss differs"."""

from types import SimpleNamespace

import numpy as np
import pytest

import manual_bp as bp
from manual_bp import example
from oracle import check
from oracle.checker import CandidateError
from oracle.strategies import draw_data, draw_params


def _case(name="seed-nielsen"):
    spec = example(name)
    rng = np.random.default_rng(0)
    params = draw_params(spec, rng, "well_conditioned")
    x, y = draw_data(spec, rng, "well_conditioned", 4)
    return spec, params, x, y


def _with_forward(change=None, key_of=lambda w, i: f"{w}.layers.{i}"):
    """manual_bp, optionally on parameters changed by ``change`` (a forward bug), reporting every z and a."""
    def fn(spec, params, x, y):
        q = change(dict(params)) if change else params
        cache = bp.forward(spec, q, x)
        g = bp.backward(cache, y)
        forward = {key_of(w, i): (cache.z[i] if w == "z" else cache.a[i + 1]) for i in range(len(spec.layers)) for w in "za"}
        return SimpleNamespace(loss=g.loss, grads=g.grads, deltas=g.deltas, grad_input=g.grad_input, forward=forward)
    return fn


def test_the_right_forward_passes():
    spec, params, x, y = _case()
    assert check(spec, params, x, y, _with_forward()).passed


@pytest.mark.parametrize("layer", [0, 1])
def test_a_wrong_bias_in_the_forward_is_named_at_its_layer(layer):
    spec, params, x, y = _case()

    def doubled(p):
        p[f"layers.{layer}.bias"] = p[f"layers.{layer}.bias"] * 2
        return p

    result = check(spec, params, x, y, _with_forward(doubled))
    assert result.classification == "forward" and result.first_divergent_layer == layer, result.message()
    assert result.localization.startswith(f"FORWARD: z of layer {layer} is the first forward tensor to differ")


def test_an_unknown_forward_key_is_refused():
    spec, params, x, y = _case()
    with pytest.raises(CandidateError, match="unknown key"):
        check(spec, params, x, y, _with_forward(key_of=lambda w, i: f"{w}.layer{i}"))
