"""The spec format: built-ins, exact JSON round trip, and one clear error per kind of bad input."""

import json

import pytest

from manual_bp import Spec, SpecError, example, example_names, load_spec

GOOD = {
    "format_version": 1,
    "input_size": 3,
    "layers": [
        {"type": "dense", "units": 4, "activation": {"name": "leaky_relu", "negative_slope": 0.1}, "bias": True},
        {"type": "dense", "units": 2, "activation": "identity", "bias": False},
    ],
    "loss": {"name": "huber", "delta": 0.5},
}


def test_builtin_examples_exist_and_load():
    names = example_names()
    for required in ("seed-simple", "seed-linear-regression", "seed-logistic-regression", "seed-sse"):
        assert required in names
    simple = example("seed-simple")
    assert [l.activation.name for l in simple.layers] == ["sigmoid", "sigmoid", "identity"]
    assert not any(l.bias for l in simple.layers) and simple.loss.name == "half_sse"


@pytest.mark.parametrize("name", example_names())
def test_builtin_files_are_canonical(name):
    """A built-in's to_dict is exactly what its file says (nothing added, nothing lost)."""
    from importlib import resources

    text = resources.files("manual_bp.specs").joinpath(f"{name}.json").read_text(encoding="utf-8")
    assert example(name).to_dict() == json.loads(text)


def test_exact_json_round_trip():
    spec = Spec.from_dict(GOOD)
    text = spec.to_json()
    again = Spec.from_json(text)
    assert again == spec and again.to_json() == text
    assert json.loads(text)["layers"][0]["activation"] == {"name": "leaky_relu", "negative_slope": 0.1}
    assert spec.param_shapes() == {"layers.0.weight": (4, 3), "layers.0.bias": (4,), "layers.1.weight": (2, 4)}


def _with(path, value):
    obj = json.loads(json.dumps(GOOD))
    *head, last = path
    target = obj
    for key in head:
        target = target[key]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return obj


BAD = [
    (("layers", 0, "activation"), "sigmod", "layers[0].activation", "unknown activation 'sigmod'"),
    (("loss",), "hinge", "loss", "unknown loss 'hinge'"),
    (("layers", 0, "units"), 0, "layers[0].units", "0 is not positive"),
    (("layers", 0, "units"), 2.5, "layers[0].units", "not an integer"),
    (("layers", 0, "units"), True, "layers[0].units", "not an integer"),
    (("input_size",), -3, "input_size", "not positive"),
    (("input_size",), KeyError, "input_size", "missing"),
    (("layers", 1, "activation"), KeyError, "layers[1].activation", "missing"),
    (("layers", 0, "colour"), "red", "layers[0].colour", "unknown field"),
    (("extra",), 1, "extra", "unknown field"),
    (("layers", 0, "type"), "conv9d", "layers[0].type", "unknown layer type"),
    (("layers", 0, "bias"), "yes", "layers[0].bias", "not true or false"),
    (("layers", 0, "activation"), {"name": "leaky_relu", "slope": 0.1}, "layers[0].activation", "no parameter 'slope'"),
    (("layers", 0, "activation"), {"name": "elu", "alpha": "big"}, "layers[0].activation.alpha", "not a finite number"),
    (("loss",), {"name": "huber", "delta": -1}, "loss.delta", "not a positive number"),
    (("layers",), [], "layers", "non-empty list"),
    (("format_version",), 7, "format_version", "not supported"),
    (("loss",), "nll", "loss", "log_softmax"),
    (("loss",), "bce", "loss", "probabilities"),
    (("layers", 0, "activation"), "softmax", "layers[0].activation", "may only end the network"),
]


@pytest.mark.parametrize("path,value,field,words", BAD, ids=[b[2] + ":" + b[3] for b in BAD])
def test_bad_specs_name_the_field_and_the_fix(path, value, field, words):
    with pytest.raises(SpecError) as info:
        Spec.from_dict(_with(path, value))
    assert info.value.field == field
    assert words in str(info.value)
    assert info.value.fix  # every message tells the user what to do


def test_class_index_cross_entropy_on_one_unit_is_refused():
    obj = _with(("layers", 1, "units"), 1)
    obj["loss"] = "cross_entropy"
    with pytest.raises(SpecError, match="cross_entropy.*at least 2 output units, not 1"):
        Spec.from_dict(obj)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(SpecError, match="cannot be read"):
        load_spec(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format_version": 1,')
    with pytest.raises(SpecError, match="not valid JSON"):
        load_spec(bad)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"name": "caf\xe9"}')
    with pytest.raises(SpecError, match="not UTF-8"):
        load_spec(latin)
    top = tmp_path / "list.json"
    top.write_text("[1, 2]")
    with pytest.raises(SpecError, match="not an object"):
        load_spec(top)


def test_bias_defaults_to_true_when_left_out():
    obj = json.loads(json.dumps(GOOD))
    del obj["layers"][0]["bias"]
    assert Spec.from_dict(obj).layers[0].bias is True


@pytest.mark.parametrize("value,field,words", [
    ({"negative_slope": 0.1}, "layers[0].activation", "has no 'name'"),
    ({"name": 3}, "layers[0].activation.name", "is not a string"),
    (7, "layers[0].activation", "neither a name nor an object"),
])
def test_activation_objects_that_are_not_named_properly(value, field, words):
    """Found by mutation testing: these branches of parse_named had no test."""
    with pytest.raises(SpecError) as info:
        Spec.from_dict(_with(("layers", 0, "activation"), value))
    assert info.value.field == field and words in str(info.value) and info.value.fix
