"""The second correct implementation (tests/impls/second_correct.py) on embedding and residual layers: it
agrees with torch.autograd (torch.nn.functional written out here, blocks built by hand, not the oracle's twin)
to float64 rounding, every inner δ included, and the oracle passes it on drawn networks with residual blocks
and on drawn token networks.

Its code for these is its own: the embedding's ∂C/∂W as a one-hot product Hᵀδ, the residual blocks opened
into a tape walked backward with one accumulated adjoint per value (not manual_bp's recursive block backward).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings

import manual_bp as bp
import oracle
from oracle.graph import nodes
from oracle.strategies import cases, embedding_specs, with_residuals

from .helpers import assert_close_to_reference
from .impls.second_correct import grads

ACT = {"identity": lambda t: t, "tanh": torch.tanh, "relu": F.relu, "sigmoid": torch.sigmoid}


def spec_of(shape, layers, loss="mse"):
    return bp.Spec.from_dict({"format_version": 2, "input": {"shape": list(shape)}, "layers": layers, "loss": loss})


def dense(units, act="identity", bias=True):
    return {"type": "dense", "units": units, "activation": act, "bias": bias}


def conv2d(out, k=3, act="identity", padding="same", bias=True):
    return {"type": "conv2d", "out_channels": out, "kernel_size": k, "padding": padding, "activation": act,
            "bias": bias}


def block(body, projection=None, act="identity"):
    return {"type": "residual", "body": body, "projection": projection, "activation": act}


# -- torch reference -------------------------------------------------------------------------------------------
def _torch_layer(layer, key, a, P, zs):
    """The layer (a block recursively) at ``key`` on a, by torch.nn.functional; every node's z kept in zs."""
    w = lambda n: P.get(f"{key}.{n}")  # noqa: E731
    kind = layer.type
    if kind == "residual":
        h = a
        for j, inner in enumerate(layer.body):
            h = _torch_layer(inner, f"{key}.body.{j}", h, P, zs)
        skip = a if layer.projection is None else _torch_layer(layer.projection, f"{key}.projection", a, P, zs)
        z = h + skip
    elif kind == "embedding":
        z = F.embedding(a, w("weight"), padding_idx=layer.padding_idx)
    elif kind == "dense":
        z = F.linear(a, w("weight"), w("bias"))
    elif kind == "conv2d":
        pad = layer.padding if isinstance(layer.padding, str) else tuple(layer.padding)
        z = F.conv2d(a, w("weight"), w("bias"), stride=tuple(layer.stride), padding=pad)
    elif kind == "flatten":
        z = a.flatten(1)
    elif kind == "batch_norm":  # running stats cloned: F.batch_norm updates them in place in training mode
        rm, rv = w("running_mean").detach().clone(), w("running_var").detach().clone()
        z = F.batch_norm(a, rm, rv, w("weight"), w("bias"), layer.training, layer.momentum, layer.eps)
    elif kind == "layer_norm":
        z = F.layer_norm(a, tuple(layer.normalized_shape), w("weight"), w("bias"), layer.eps)
    else:
        raise ValueError(kind)
    z.retain_grad()
    zs[key] = z
    return ACT[layer.activation.name](z)


def torch_reference(spec, params, x, y):
    """(loss, grads, deltas) by torch.autograd; δ of every node (body layers, projections, sums) from its z."""
    P = {k: torch.tensor(v, requires_grad=k in spec.param_shapes()) for k, v in params.items()}
    a = torch.tensor(x) if spec.token_input else torch.tensor(x, requires_grad=True)
    zs: dict = {}
    for i, layer in enumerate(spec.layers):
        a = _torch_layer(layer, f"layers.{i}", a, P, zs)
    assert spec.loss.name == "mse"
    loss = F.mse_loss(a, torch.tensor(y))
    loss.backward()
    return (float(loss.detach()), {k: P[k].grad.numpy() for k in spec.param_shapes()},
            {k: z.grad.numpy() for k, z in zs.items()})


def assert_matches_torch(spec, params, x, y):
    loss, g, d = grads(spec, params, x, y)
    ref_loss, ref_g, ref_d = torch_reference(spec, params, x, y)
    assert list(g) == list(spec.param_shapes()) and set(g) == set(ref_g)   # trainable parameters only, no buffers
    assert set(d) == set(ref_d)                                              # every node's δ, inner ones too
    assert_close_to_reference(spec, (loss, g, d), (ref_loss, ref_g, ref_d))
    return g, d


BN = {"type": "batch_norm", "training": True, "activation": "relu"}
SPECS = {
    "embedding, padding_idx": spec_of([5], [
        {"type": "embedding", "num_embeddings": 4, "embedding_dim": 3, "padding_idx": 1},
        {"type": "flatten"}, dense(2)]),
    "embedding, layer norm, no padding": spec_of([4], [
        {"type": "embedding", "num_embeddings": 3, "embedding_dim": 5, "padding_idx": None},
        {"type": "layer_norm", "normalized_shape": [5], "activation": "tanh"}, {"type": "flatten"}, dense(2)]),
    "dense residual, identity skip": spec_of([4], [
        dense(4, "tanh"), block([dense(6, "relu"), dense(4, "tanh")], act="relu"), dense(2)]),
    "dense residual, dense projection": spec_of([4], [
        dense(5, "tanh"), block([dense(6, "tanh"), dense(3)], projection=dense(3, bias=False), act="tanh"), dense(2)]),
    "residual first, identity skip": spec_of([3], [block([dense(3, "sigmoid")]), dense(2)]),
    "conv residual, batch norm, 1×1 conv projection": spec_of([2, 4, 4], [
        block([conv2d(3), BN, conv2d(3, act="tanh")], projection=conv2d(3, k=1, padding=0), act="relu"),
        {"type": "flatten"}, dense(2)]),
    "nested residual": spec_of([4], [
        dense(4, "tanh"),
        block([dense(4, "tanh"), block([dense(5, "relu"), dense(4)], act="tanh"), dense(3, "tanh")],
              projection=dense(3), act="relu"),
        block([block([dense(3, "tanh")])]),
        dense(2)]),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_matches_torch_in_float64(name):
    spec = SPECS[name]
    params, x, y = bp.random_case(spec, 5, batch=3)
    assert_matches_torch(spec, params, x, y)


def test_embedding_repeated_tokens_accumulate_and_padding_row_is_zero():
    spec = SPECS["embedding, padding_idx"]
    params, _, y = bp.random_case(spec, 2, batch=3)
    x = np.array([[0, 1, 0, 2, 0], [1, 1, 3, 3, 0], [2, 2, 2, 1, 0]])  # repeats; padding token 1 used; 3 repeats
    g, d = assert_matches_torch(spec, params, x, y)
    assert not np.any(g["layers.0.weight"][1])                            # padding row: no gradient
    delta = d["layers.0"]
    np.testing.assert_allclose(g["layers.0.weight"][0], delta[x == 0].sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(g["layers.0.weight"][3], delta[x == 3].sum(axis=0), rtol=1e-12)


def test_inner_deltas_are_named_as_the_oracle_names_them():
    spec = SPECS["nested residual"]
    params, x, y = bp.random_case(spec, 1, batch=3)
    _, _, d = grads(spec, params, x, y)
    want = {node.name for node in nodes(spec)}
    assert set(d) == want
    np.testing.assert_array_equal(d["layers.1.projection"], d["layers.1"])


def test_embedding_keeps_float32_and_integer_tokens():
    spec = SPECS["embedding, padding_idx"]
    params, x, y = bp.random_case(spec, 3, batch=3)
    p32 = {k: v.astype(np.float32) for k, v in params.items()}
    loss, g, d = grads(spec, p32, x, y.astype(np.float32))
    assert all(v.dtype == np.float32 for v in (*g.values(), *d.values())) and np.asarray(loss).dtype == np.float32


# -- the oracle passes it on drawn networks -----------------------------------------------------------------------
def _passes(case):
    result = oracle.check(case.spec, case.params, case.x, case.y, grads)
    assert result.passed, (f"{case.regime} {case.dtype} seed={case.seed}\n{case.spec.to_dict()}\n"
                           f"{result.message()}")


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(cases(specs_strategy=with_residuals(), max_batch=4))
def test_oracle_passes_it_on_residual_networks(case):
    _passes(case)


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(cases(specs_strategy=embedding_specs(), max_batch=4))
def test_oracle_passes_it_on_embedding_networks(case):
    _passes(case)
