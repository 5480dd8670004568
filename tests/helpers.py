"""Test helpers that compute things independently of the code under test."""

import numpy as np


def central_difference(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """∂f/∂x by central differences, element by element, step h·max(1, |x|)."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        step = h * max(1.0, abs(x[idx]))
        xp, xm = x.copy(), x.copy()
        xp[idx] += step
        xm[idx] -= step
        grad[idx] = (f(xp) - f(xm)) / (2 * step)
    return grad


def functional_reference(spec, params, x, y):
    """torch.autograd on a chain of layers written out with torch.nn.functional here (not the oracle's twin), mse
    loss: ``(loss, grads, deltas, grad_input, buffers)``; δ_i = ∂C/∂z_i of each layer's output before its activation,
    buffers the running statistics after the forward (F.batch_norm updates its copies in place in training mode)."""
    import torch
    import torch.nn.functional as F

    import manual_bp as bp

    act = {"identity": lambda t: t, "tanh": torch.tanh, "relu": F.relu, "sigmoid": torch.sigmoid}
    P = {k: torch.tensor(v, requires_grad=True) for k, v in params.items() if k in spec.param_shapes()}
    P.update({k: torch.tensor(params[k]) for k in spec.buffer_shapes()})
    xt = torch.tensor(x, requires_grad=True)
    a, zs = xt, []
    for i, l in enumerate(spec.layers):
        w = lambda n: P.get(f"layers.{i}.{n}")  # noqa: E731
        if l.type == "dense":
            z = F.linear(a, w("weight"), w("bias"))
        elif l.type in ("conv1d", "conv2d"):
            z = (F.conv1d if l.type == "conv1d" else F.conv2d)(a, w("weight"), w("bias"))
        elif l.type == "flatten":
            z = a.flatten(1)
        elif l.type == "batch_norm":
            z = F.batch_norm(a, w("running_mean"), w("running_var"), w("weight"), w("bias"), l.training, l.momentum, l.eps)
        elif l.type == "layer_norm":
            shape = tuple(a.shape[-1:]) if l.normalized_shape is None else tuple(l.normalized_shape)
            z = F.layer_norm(a, shape, w("weight"), w("bias"), l.eps)
        elif l.type == "group_norm":
            z = F.group_norm(a, l.num_groups, w("weight"), w("bias"), l.eps)
        elif l.type == "dropout":
            keep = torch.from_numpy(np.random.default_rng(l.seed).random(tuple(a.shape)) >= l.p)
            z = a * keep / (1 - l.p) if l.training else a * 1
        else:
            raise AssertionError(f"no functional reference for {l.type}")
        z.retain_grad()
        zs.append(z)
        a = act[l.activation.name](z)
    loss = F.mse_loss(a, torch.tensor(y))
    loss.backward()
    return (loss.item(), {k: P[k].grad.numpy() for k in spec.param_shapes()},
            {f"layers.{i}": z.grad.numpy() for i, z in enumerate(zs)}, xt.grad.numpy(),
            {k: P[k].numpy() for k in spec.buffer_shapes()})


def assert_close_to_reference(spec, got, ref, rtol=1e-9):
    """(loss, grads, deltas) against a torch reference's, float64, element by element; the atol is 1e-12 of the
    largest reference value (a sum that cancels, e.g. β's gradient before a training-mode batch norm, is rounding)."""
    (loss, g, d), (ref_loss, ref_g, ref_d) = got, ref
    np.testing.assert_allclose(loss, ref_loss, rtol=rtol)
    scale = max(float(np.abs(t).max()) for t in (*ref_g.values(), *ref_d.values()) if t.size)
    for name, want in {**ref_g, **ref_d}.items():
        have = {**g, **d}[name]
        assert have.shape == want.shape and have.dtype == np.float64, name
        np.testing.assert_allclose(have, want, rtol=rtol, atol=1e-12 * scale, err_msg=f"{spec.describe()}: {name}")


def dense_backprop_source(doc: str, delta: str, bias: str = "delta.sum(axis=0)") -> str:
    """The source of an ``--impl`` file: manual_bp's dense backward written out, with the expression ``delta`` (in g,
    z, a and act, the layer's activation) for δ and ``bias`` for ∂C/∂b: where a test injects its bugs."""
    return f'''
"""{doc}"""
import manual_bp as bp


def grads(spec, params, x, y):
    c = bp.forward(spec, params, x)
    out_rows, y_rows = spec.loss.as_rows(c.output, y)
    loss = spec.loss.value(out_rows, y_rows)
    g = spec.loss.grad(out_rows, y_rows).reshape(c.output.shape)
    grads, deltas = {{}}, {{}}
    for i in reversed(range(len(spec.layers))):
        layer, act = spec.layers[i], spec.layers[i].activation
        z, a = c.z[i], c.a[i + 1]
        delta = {delta}
        deltas[f"layers.{{i}}"] = delta
        grads[f"layers.{{i}}.weight"] = delta.T @ c.a[i]
        if layer.bias:
            grads[f"layers.{{i}}.bias"] = {bias}
        g = delta @ params[f"layers.{{i}}.weight"]
    return loss, grads, deltas
'''


def uncapped(allow):
    """``allow`` (a ``rounding.Allowance``) with every analytic bound infinite: ``noise.measured_allowance`` then
    returns the ensemble's own figure (FACTOR × the largest deviation of its runs), not that figure capped by the
    worst case."""
    import dataclasses

    return dataclasses.replace(allow, bounds={k: np.full(np.shape(v), np.inf) for k, v in allow.bounds.items()})
