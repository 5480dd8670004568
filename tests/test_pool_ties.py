"""Max-pool ties are a convention, like the side of a kink: any tied element (or a convex split) may take a
window's δ, and the oracle follows the candidate's choice before judging the layers below. Routing δ to
*every* tied element (the mask ``a == max`` without sharing) counts it twice and stays a bug.

The candidates here are written independently of manual_bp's pooling: one loop per window.
"""

import numpy as np
import pytest

import manual_bp as bp
import oracle

from .helpers import uncapped


def _pool_backward(layer, a, delta, mode):
    """∂C/∂a of a 2-D max pool, window by window, sending δ to the first / last tied element, splitting it
    evenly among them, or (a bug) giving all of it to each."""
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    grad = np.zeros_like(a)
    m, C, H, W = a.shape
    for n in range(m):
        for c in range(C):
            for i in range(delta.shape[2]):
                for j in range(delta.shape[3]):
                    cells = [(r, q) for r in range(i * sh - ph, i * sh - ph + kh) for q in range(j * sw - pw, j * sw - pw + kw)
                             if 0 <= r < H and 0 <= q < W]
                    best = max(a[n, c, r, q] for r, q in cells)
                    tied = [cell for cell in cells if a[n, c, cell[0], cell[1]] == best]
                    share = {"first": [(tied[0], 1.0)], "last": [(tied[-1], 1.0)],
                             "split": [(t, 1.0 / len(tied)) for t in tied], "all": [(t, 1.0) for t in tied]}[mode]
                    for (r, q), w in share:
                        grad[n, c, r, q] += w * delta[n, c, i, j]
    return grad


def _candidate(mode, double_conv_weight=False):
    def grads_fn(spec, params, x, y):
        cache = bp.forward(spec, params, x)
        loss = spec.loss.value(cache.output, y)
        grads, deltas = {}, {}
        up = spec.loss.grad(cache.output, y)
        for i in reversed(range(len(spec.layers))):
            layer = spec.layers[i]
            delta = layer.activation.vjp(cache.z[i], cache.a[i + 1], up)
            deltas[f"layers.{i}"] = delta
            if layer.type == "max_pool2d":
                nabla, up = {}, _pool_backward(layer, cache.a[i], delta, mode)
            else:
                nabla, up = layer.backward(cache.layer_params(i), cache.a[i], delta)
            for name, g in nabla.items():
                grads[f"layers.{i}.{name}"] = 2 * g if double_conv_weight and layer.type == "conv2d" and name == "weight" else g
        return loss, grads, deltas  # δ of the conv layer shows the routing
    return grads_fn


def _tied_case(seed=0):
    """Integer data whose 2×2 windows tie: a 1×1 conv (identity), a max pool, a dense head."""
    layers = [{"type": "conv2d", "out_channels": 2, "kernel_size": 1, "activation": "identity"},
              {"type": "max_pool2d", "kernel_size": 2},
              {"type": "flatten"},
              {"type": "dense", "units": 3, "activation": "identity"}]
    spec = bp.Spec.from_dict({"format_version": 2, "input": {"shape": [2, 4, 4]}, "loss": "half_sse", "layers": layers})
    rng = np.random.default_rng(seed)
    params = {k: rng.integers(-3, 4, v.shape).astype(np.float64) + (k.endswith("weight") and v.ndim == 4) * 4
              for k, v in bp.init_params(spec, rng).items()}
    x = rng.integers(0, 3, (3, 2, 4, 4)).astype(np.float64)  # values 0..2: most windows tie
    y = rng.standard_normal((3, 3))
    return spec, params, x, y


@pytest.mark.parametrize("mode", ["last", "split"])
def test_another_valid_routing_at_ties_passes_as_a_kink_with_a_note(mode):
    spec, params, x, y = _tied_case()
    strict = oracle.check(spec, params, x, y, _candidate("first"))
    assert strict.classification == "match", strict.message()       # torch's CPU kernel takes the first
    result = oracle.check(spec, params, x, y, _candidate(mode))
    assert result.passed and result.classification == "kink", result.message()
    assert any("Tie convention" in n for n in result.notes), result.notes
    assert "valid choice first departs from torch's at layer 0" in result.localization and "wrong" not in result.localization


def test_routing_delta_to_every_tied_element_is_a_bug():
    spec, params, x, y = _tied_case()
    result = oracle.check(spec, params, x, y, _candidate("all"))
    assert not result.passed and result.classification == "bug", result.message()


@pytest.mark.parametrize("mode", ["first", "last", "split"])
def test_a_bug_below_a_tie_is_a_bug_whichever_routing_the_candidate_takes(mode):
    spec, params, x, y = _tied_case()
    result = oracle.check(spec, params, x, y, _candidate(mode, double_conv_weight=True))
    assert not result.passed and result.classification == "bug", result.message()
    assert result.first_divergent_layer == 0


def test_float32_saturated_tanh_before_a_max_pool_is_judged_on_float64_truth():
    """tanh saturates to 1.0 in float32, so the candidate sees ties where float64 torch sees a winner:
    a correct float32 implementation (manual_bp, first of its ties) and the other routings all pass."""
    spec = bp.Spec.from_dict({"format_version": 2, "input": {"shape": [1, 6, 6]}, "loss": "half_sse", "layers": [
        {"type": "conv2d", "out_channels": 3, "kernel_size": 3, "padding": 1, "activation": "tanh"},
        {"type": "max_pool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "dense", "units": 2, "activation": "identity"}]})
    rng = np.random.default_rng(4)
    params = {k: (6 * v).astype(np.float32) for k, v in bp.init_params(spec, rng).items()}
    x = (4 * rng.standard_normal((2, 1, 6, 6))).astype(np.float32)
    y = rng.standard_normal((2, 2)).astype(np.float32)
    for grads_fn in (None, _candidate("last"), _candidate("split")):
        result = oracle.check(spec, params, x, y, grads_fn)
        assert result.passed, result.message()


@pytest.mark.parametrize("keys", [None, ["layers.0", "layers.1", "layers.2", "layers.3"], ["layers.3"], ["layers.1"]],
                         ids=["no-delta", "every-delta", "output-delta-only", "pool-delta-only"])
def test_a_kink_choice_is_followed_whatever_subset_of_delta_the_candidate_returns(keys):
    """relu′(0) = 1 at a unit whose z is exactly 0 (and its window's max): a valid convention, whether the
    candidate returns every δ, none, or only some (the choice on layers without δ is then tried, not assumed)."""
    from oracle.mutants import CATALOGUE

    spec = bp.Spec.from_dict({"format_version": 2, "input": {"shape": [1, 4]}, "loss": "half_sse", "layers": [
        {"type": "conv1d", "out_channels": 2, "kernel_size": 1, "activation": "relu"},
        {"type": "max_pool1d", "kernel_size": 2}, {"type": "flatten"},
        {"type": "dense", "units": 1, "activation": "identity", "bias": False}]})
    params = {"layers.0.weight": np.array([[[1.0]], [[-1.0]]]), "layers.0.bias": np.array([0.0, 1.0]),
              "layers.3.weight": np.array([[1.0, 2.0, -1.0, 0.5]])}
    x, y = np.array([[[1.0, 2.0, 3.0, 0.0]]]), np.array([[0.0]])
    other_slope = next(m for m in CATALOGUE if m.name == "relu_prime_at_zero_is_one")

    def grads_fn(s, p, xx, yy):
        loss, grads, deltas = other_slope.grads_fn(s, p, xx, yy)
        return (loss, grads) if keys is None else (loss, grads, {k: deltas[k] for k in keys})

    result = oracle.check(spec, params, x, y, grads_fn)
    assert result.passed and result.classification == "kink", result.message()


def test_a_tie_rerun_is_judged_by_measured_noise_not_the_looser_worst_case():
    """Dead relu windows tie at 0, so a failing check goes to the routing re-run; that re-run used to be
    judged by the analytic worst case (1-52x the measured allowance), and δ sent to each window's first
    element wherever its max is passed as a tie convention on this saturated float32 net."""
    from oracle.mutants import CATALOGUE
    from oracle.strategies import draw_data, draw_params

    spec = bp.Spec.from_dict({"format_version": 2, "input": {"shape": [2, 6, 6]}, "loss": "mse", "layers": [
        {"type": "conv2d", "out_channels": 3, "kernel_size": 2, "activation": "relu"},
        {"type": "max_pool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "dense", "units": 3, "activation": "tanh"},
        {"type": "dense", "units": 2, "activation": "identity"}]})
    rng = np.random.default_rng(1)
    params = draw_params(spec, rng, "saturated", "float32")
    x, y = draw_data(spec, rng, "saturated", 3, "float32")
    window_start = next(m for m in CATALOGUE if m.name == "max_pool_grad_to_window_start")
    assert oracle.check(spec, params, x, y).passed
    result = oracle.check(spec, params, x, y, window_start.grads_fn)
    assert not result.passed and result.classification == "bug", result.message()


def test_a_tie_whose_routing_shows_only_through_the_other_side_of_a_kink_is_read():
    """gelu underflows in torch (−0.0) where the exact value is a tiny negative, so the relu conv above sees z
    exactly 0 in torch and a tiny nonzero z in an exact implementation, whose max pool then routes to another
    tied element: reading its routing from δ must predict with the kink's other slope there. Recorded as a
    false alarm of second_correct (seed 21), rebuilt by ``oracle.rates.replay``."""
    from oracle.rates import load_second_correct, replay

    info = {'spec': {'format_version': 2, 'name': '', 'description': '', 'input': {'shape': [2, 10]}, 'layers': [{'type': 'conv1d', 'out_channels': 2, 'kernel_size': 3, 'stride': 2, 'padding': 2, 'dilation': 1, 'groups': 1, 'activation': 'gelu', 'bias': False}, {'type': 'max_pool1d', 'kernel_size': 2, 'stride': 1, 'padding': 0}, {'type': 'conv1d', 'out_channels': 4, 'kernel_size': 1, 'stride': 1, 'padding': 0, 'dilation': 2, 'groups': 2, 'activation': 'relu', 'bias': False}, {'type': 'max_pool1d', 'kernel_size': 2, 'stride': 1, 'padding': 0}, {'type': 'conv1d', 'out_channels': 1, 'kernel_size': 3, 'stride': 2, 'padding': 0, 'dilation': 1, 'groups': 1, 'activation': 'silu', 'bias': True}, {'type': 'max_pool1d', 'kernel_size': 1, 'stride': 2, 'padding': 0}, {'type': 'flatten'}, {'type': 'dense', 'units': 5, 'activation': 'gelu', 'bias': False}, {'type': 'dense', 'units': 6, 'activation': 'gelu_tanh', 'bias': False}], 'loss': 'mse'}, 'regime': 'saturated', 'dtype': 'float64', 'batch': 3, 'data_seed': 100}
    spec, params, x, y = replay(info)
    result = oracle.check(spec, params, x, y, load_second_correct())
    assert result.passed, result.message()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_noise_around_a_routing_rerun_follows_its_routes(dtype):
    """A candidate that sends each tied window's δ to its last element is judged against torch re-run with that
    routing (``run_twin(routes=...)``), within the noise measured around that re-run: every run of the ensemble must
    route the same way. One that kept torch's picks would differ from the re-run below the pool by whole window δs,
    not by rounding. So the ensemble's own figure (the analytic cap lifted) stays within FACTOR × the re-run's
    analytic worst case (``oracle.rounding``, computed with the same routes), element by element."""
    from oracle.noise import FACTOR, measured_allowance
    from oracle.rounding import allowance
    from oracle.twin import route_weights, run_twin

    spec, params, x, y = _tied_case()
    ref = run_twin(spec, params, x, y, np.float64)
    ties = allowance(spec, params, x, y, ref, dtype).ties[1]  # the max pool's windows, their contenders marked
    routes = {1: route_weights(ties, 2, "last")}
    again = run_twin(spec, params, x, y, np.float64, routes=routes)
    assert np.abs(again.deltas["layers.0"] - ref.deltas["layers.0"]).max() > 1  # the premise: the routing matters
    allow = allowance(spec, params, x, y, again, dtype, routes=routes)
    measured = measured_allowance(spec, params, x, y, again, uncapped(allow), dtype, routes=routes)
    for k in ("layers.0.delta", "input.grad"):
        assert measured[k].max() > 0, k
        over = measured[k] > FACTOR * allow.bounds[k]
        assert not over.any(), (k, f"{int(over.sum())} elements, up to {measured[k][over].max():.3g}")
