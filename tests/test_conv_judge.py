"""The judge on convolution and pooling nets: the rounding allowance of every layer type (oracle.magnitudes)
covers a correct implementation computing in float32 or float64, element by element, against float64
torch; it stays small enough to catch bugs; and a wrong conv backward is a bug in both dtypes."""

import numpy as np
import pytest

import manual_bp as bp
import oracle
from oracle.noise import measured_allowance
from oracle.rounding import allowance
from oracle.twin import run_twin


def _spec(layers, shape, loss="half_sse"):
    return bp.Spec.from_dict({"format_version": 2, "input": {"shape": shape}, "loss": loss, "layers": layers})


NETS = {
    "conv2d-avg-conv-dense": _spec([
        {"type": "conv2d", "out_channels": 4, "kernel_size": 3, "padding": 1, "activation": "tanh"},
        {"type": "avg_pool2d", "kernel_size": 2},
        {"type": "conv2d", "out_channels": 3, "kernel_size": 2, "stride": 2, "activation": "softplus"},
        {"type": "flatten"}, {"type": "dense", "units": 3, "activation": "identity"}], [2, 8, 8]),
    "conv1d-same-groups-bce": _spec([
        {"type": "conv1d", "out_channels": 4, "kernel_size": 3, "dilation": 2, "padding": "same", "activation": "sigmoid"},
        {"type": "avg_pool1d", "kernel_size": 3, "stride": 2, "padding": 1, "count_include_pad": False},
        {"type": "conv1d", "out_channels": 4, "kernel_size": 2, "groups": 2, "activation": "gelu"},
        {"type": "max_pool1d", "kernel_size": 3, "stride": 1},
        {"type": "flatten"}, {"type": "dense", "units": 2, "activation": "sigmoid"}], [2, 12], "bce"),
    "conv2d-rect-ce": _spec([
        {"type": "conv2d", "out_channels": 3, "kernel_size": [3, 2], "activation": "elu"},
        {"type": "avg_pool2d", "kernel_size": 2, "stride": 1},
        {"type": "flatten"}, {"type": "dense", "units": 4, "activation": "identity"}], [1, 6, 5], "cross_entropy"),
}


def _case(spec, dtype, scale, seed):
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    params = {k: (scale * v).astype(dt) for k, v in bp.init_params(spec, rng).items()}
    x = (scale * rng.standard_normal((3, *spec.input_shape))).astype(dt)
    if spec.loss.targets == "classes":
        y = rng.integers(0, spec.layers[-1].units, 3)
    elif spec.loss.name == "bce":
        y = rng.random((3, spec.layers[-1].units)).astype(dt)
    else:
        y = rng.standard_normal((3, spec.layers[-1].units)).astype(dt)
    return params, x, y


def _f64(params, x, y, spec):
    return ({k: v.astype(np.float64) for k, v in params.items()}, x.astype(np.float64),
            y if spec.loss.targets == "classes" else y.astype(np.float64))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("scale", [1.0, 5.0], ids=["well", "saturated"])
@pytest.mark.parametrize("name", NETS)
def test_the_allowance_covers_a_correct_implementation_in_its_dtype(name, scale, dtype):
    spec = NETS[name]
    params, x, y = _case(spec, dtype, scale, seed=1)
    p64, x64, y64 = _f64(params, x, y, spec)
    ref = run_twin(spec, p64, x64, y64, np.float64)
    allow = allowance(spec, p64, x64, y64, ref, np.dtype(dtype))
    measured = measured_allowance(spec, p64, x64, y64, ref, allow, np.dtype(dtype))
    with np.errstate(over="ignore"):
        g = bp.gradients(spec, params, x, y)
    got = {"loss": g.loss, **g.grads, **{f"{k}.delta": v for k, v in g.deltas.items()}, "input.grad": g.grad_input}
    want = {"loss": ref.loss, **ref.grads, **{f"{k}.delta": v for k, v in ref.deltas.items()}, "input.grad": ref.grad_input}
    eps = float(np.finfo(np.dtype(dtype)).eps)
    for key, value in got.items():
        err = np.abs(np.asarray(value, dtype=np.float64) - want[key])
        bound = np.asarray(allow.bounds[key])
        assert np.all(err <= bound), (key, float(np.max(err / np.maximum(bound, 1e-300))))
        size = max(float(np.max(np.abs(want[key]))), 1e-300)
        # what the verdict uses: measured, so a few thousand ulps at most, where bugs are far larger
        assert float(np.max(measured[key])) <= 1e4 * eps * size, (key, float(np.max(measured[key])) / size / eps)
    assert oracle.check(spec, params, x, y).passed


def _flipped_kernel_weight_grad(spec, params, x, y):
    """A common conv mistake: ∂C/∂θ computed with the kernel's spatial axes reversed (a convolution where
    the forward is a correlation)."""
    g = bp.gradients(spec, params, x, y)
    grads = dict(g.grads)
    for i, layer in enumerate(spec.layers):
        if layer.type.startswith("conv"):
            w = grads[f"layers.{i}.weight"]
            grads[f"layers.{i}.weight"] = w[(..., *(slice(None, None, -1),) * (w.ndim - 2))].copy()
            break
    return g.loss, grads


def _bias_summed_over_batch_only(spec, params, x, y):
    """∂C/∂b of the first conv summed over the batch at one position only, not over every position."""
    g = bp.gradients(spec, params, x, y)
    grads = dict(g.grads)
    i = next(i for i, layer in enumerate(spec.layers) if layer.type.startswith("conv"))
    delta = g.deltas[f"layers.{i}"]
    grads[f"layers.{i}.bias"] = delta.reshape(*delta.shape[:2], -1)[:, :, 0].sum(axis=0)
    return g.loss, grads


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("scale", [1.0, 5.0], ids=["well", "saturated"])
@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("mistake", [_flipped_kernel_weight_grad, _bias_summed_over_batch_only])
def test_a_wrong_conv_backward_is_a_bug_at_its_layer(mistake, name, scale, dtype):
    spec = NETS[name]
    params, x, y = _case(spec, dtype, scale, seed=2)
    result = oracle.check(spec, params, x, y, mistake)
    assert not result.passed and result.classification == "bug", result.message()
    assert result.first_divergent_layer == 0


def _lenet_with(change):
    spec = bp.example("lenet")
    params, x, y = bp.random_case(spec, 3, batch=2)

    def grads_fn(s, p, xx, yy):
        g = bp.gradients(s, p, xx, yy)
        grads, deltas = dict(g.grads), {k: v.copy() for k, v in g.deltas.items()}
        change(grads, deltas)
        return g.loss, grads, deltas

    return oracle.check(spec, params, x, y, grads_fn)


def test_a_flipped_kernel_is_named_and_the_equation_is_the_convs():
    def flip(grads, deltas):
        grads["layers.2.weight"] = grads["layers.2.weight"][..., ::-1, ::-1].copy()

    result = _lenet_with(flip)
    assert result.classification == "bug" and result.first_divergent_layer == 2
    assert "δ ⋆ a" in result.localization and "δᵀa" not in result.localization
    assert any("kernel flipped" in h for h in result.hints["layers.2.weight"])


def test_an_error_on_the_border_of_a_feature_map_is_named():
    def border(grads, deltas):
        deltas["layers.0"][:, :, 0, :] = 0.0

    result = _lenet_with(border)
    assert result.first_divergent_layer == 0 and "routed to each window's maximum" in result.localization
    assert any("border of the feature map" in h for h in result.hints["layers.0.delta"])


def test_an_error_in_one_channel_is_named():
    def channel(grads, deltas):
        deltas["layers.1"][:, 3] *= 2

    result = _lenet_with(channel)
    assert result.first_divergent_layer == 1
    assert "the error is confined to channel 3" in result.hints["layers.1.delta"]


def test_rank_four_tensors_are_drawn_as_tiles_one_kernel_or_map_each():
    from oracle.report import SEPARATOR, tiled

    codes = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5) % 7
    grid, tile = tiled(codes)
    assert grid.shape == (2 * 5 - 1, 3 * 6 - 1) and tile == (4, 5)
    np.testing.assert_array_equal(grid[5:9, 12:17], codes[1, 2])
    assert np.all(grid[4, :] == SEPARATOR) and np.all(grid[:, 5] == SEPARATOR)
    line, tile = tiled(codes[0])          # rank 3: (A, B, L) → A rows of B tiles, a blank row between
    assert line.shape == (3 * 2 - 1, 4 * 6 - 1) and tile == (1, 5)
    np.testing.assert_array_equal(line[2, 6:11], codes[0, 1, 1])


@pytest.mark.parametrize("name", ["lenet", "seed-nielsen"])
def test_the_twin_is_a_real_module_that_loads_the_same_params(name):
    """oracle.twin.Twin: torch's own nn modules, state_dict names as the spec's, strict load_state_dict;
    its loss and autograd gradients are manual_bp's."""
    import torch

    from oracle.twin import Twin, loss_fn

    spec = bp.example(name)
    params, x, y = bp.random_case(spec, 5, batch=3)
    model = Twin(spec).load_params(params)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(s) for k, s in spec.param_shapes().items()}
    loss = loss_fn(spec.loss)(model(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    ours = bp.gradients(spec, params, x, y)
    assert loss.item() == pytest.approx(float(ours.loss), rel=1e-12)
    for k, p in model.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), ours.grads[k], rtol=1e-9, atol=1e-12)
    with pytest.raises(RuntimeError):
        model.load_params({k: v for k, v in params.items() if k != "layers.0.weight"})


def test_a_missing_one_over_the_avg_pool_window_is_named():
    spec = bp.Spec.from_dict({"format_version": 2, "input": {"shape": [2, 6, 6]}, "loss": "half_sse", "layers": [
        {"type": "conv2d", "out_channels": 3, "kernel_size": 3, "activation": "tanh"},
        {"type": "avg_pool2d", "kernel_size": [2, 3], "stride": 1},
        {"type": "flatten"}, {"type": "dense", "units": 2, "activation": "identity"}]})
    params, x, y = bp.random_case(spec, 1, batch=3)

    def times_six_below_the_pool(s, p, xx, yy):
        r = bp.gradients(s, p, xx, yy)
        grads = {k: 6 * v if k.startswith("layers.0.") else v for k, v in r.grads.items()}
        return r.loss, grads, {**r.deltas, "layers.0": 6 * r.deltas["layers.0"]}

    result = oracle.check(spec, params, x, y, times_six_below_the_pool)
    assert result.first_divergent_layer == 0
    assert any("missing 1/N in the backward of avg pool layer 1 (N = 6" in h for h in result.hints["layers.0.delta"])


def test_exchanged_spatial_axes_are_named():
    def transposed(grads, deltas):
        deltas["layers.1"] = np.swapaxes(deltas["layers.1"], 2, 3).copy()

    result = _lenet_with(transposed)
    assert result.first_divergent_layer == 1
    assert any("spatial axes exchanged" in h for h in result.hints["layers.1.delta"])
