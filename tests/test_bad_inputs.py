"""Bad input found by an outside tester: each gets one SpecError naming the field, and through the
command line exit code 2 with one line on stderr, never a traceback and never a silent wrong answer."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

import manual_bp as bp
from manual_bp import Spec, SpecError, load_spec
from manual_bp.activations import ACTIVATIONS
from manual_bp.data import MAX_VALUES, check_params, check_x, check_y, ensure_real
from manual_bp.named import Named, Rule
from manual_bp.spec import MAX_DEPTH, MAX_PARAMETERS
from oracle.cli import main

BASE = bp.example("seed-nielsen").to_dict()  # 4 -> 5 sigmoid -> 3 sigmoid -> 2 sigmoid, half_sse


def spec_with(**fields):
    obj = json.loads(json.dumps(BASE))
    obj.update(fields)
    return obj


def with_activation(act, layer=0):
    obj = spec_with()
    obj["layers"][layer]["activation"] = act
    return obj


def refused(fn, field, words=""):
    """fn() raises one SpecError whose field is ``field`` and whose message says ``words`` (and a fix)."""
    with pytest.raises(SpecError) as info:
        fn()
    err = info.value
    assert err.field == field, str(err)
    assert str(err).startswith(f"{field}: ") and words in str(err), str(err)
    assert err.fix and "\n" not in str(err)
    return err


def cli_refuses(capsys, argv, words):
    """The command line exits 2 with exactly one line `bp-oracle: error: ...` and no traceback."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (argv, out, err)
    assert err.startswith("bp-oracle: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and words in err, err
    return err


def check_file(capsys, tmp_path, text, words, *extra):
    path = tmp_path / "spec.json"
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text, encoding="utf-8")
    return cli_refuses(capsys, ["check", path, "--no-report", *extra], words)


# -- 1. nesting deep enough to exhaust the parser or the stack -------------------------------------------
DEEP = {
    "list": "[" * 100_000,
    "object": '{"a":' * 100_000 + "1" + "}" * 100_000,
    "under the parser's limit": '{"format_version": 1, "layers": ' + "[" * 200 + "]" * 200 + "}",
    "inside an activation": json.dumps(with_activation({"name": "sigmoid", "x": json.loads("[" * 40 + "]" * 40)})),
}


@pytest.mark.parametrize("text", DEEP.values(), ids=DEEP.keys())
def test_deep_nesting_is_refused_not_a_recursion_error(capsys, tmp_path, text):
    refused(lambda: Spec.from_json(text, source="net.json"), "net.json", "nested too deeply")
    check_file(capsys, tmp_path, text, "spec.json: is nested too deeply")


def test_self_containing_dict_is_refused():
    obj = spec_with()
    obj["layers"][0]["activation"] = {"name": "sigmoid"}
    obj["layers"][0]["activation"]["again"] = obj
    refused(lambda: Spec.from_dict(obj), "spec", "nested too deeply")


def test_depth_limit_leaves_room_for_every_valid_spec():
    assert MAX_DEPTH >= 4  # spec -> layers -> layer -> activation object


# -- 2. activation and loss parameters are checked by their meaning ---------------------------------------
BAD_PARAMS = [
    ({"name": "softplus", "beta": 0}, "layers[0].activation.beta", "0 is not a positive number"),
    ({"name": "softplus", "beta": -1.5}, "layers[0].activation.beta", "-1.5 is not a positive number"),
    ({"name": "softplus", "beta": 10**400}, "layers[0].activation.beta", "not a finite number"),
    ({"name": "softplus", "threshold": float("nan")}, "layers[0].activation.threshold", "nan is not a finite number"),
    ({"name": "softplus", "threshold": float("inf")}, "layers[0].activation.threshold", "not a finite number"),
    ({"name": "leaky_relu", "negative_slope": float("-inf")}, "layers[0].activation.negative_slope", "not a finite number"),
    ({"name": "elu", "alpha": True}, "layers[0].activation.alpha", "not a finite number"),
    ({"name": "hardtanh", "min_val": 1, "max_val": 1}, "layers[0].activation.min_val", "not below max_val"),
    ({"name": "hardtanh", "min_val": 2, "max_val": -2}, "layers[0].activation.min_val", "not below max_val"),
]


@pytest.mark.parametrize("act,field,words", BAD_PARAMS, ids=[f"{a}" for a, _, _ in BAD_PARAMS])
def test_activation_parameters_are_checked(act, field, words):
    refused(lambda: Spec.from_dict(with_activation(act)), field, words)


@pytest.mark.parametrize("loss,field,words", [
    ({"name": "huber", "delta": 0}, "loss.delta", "0 is not a positive number"),
    ({"name": "huber", "delta": float("nan")}, "loss.delta", "not a finite number"),
    ({"name": "smooth_l1", "beta": 0.0}, "loss.beta", "0.0 is not a positive number"),
    ({"name": "smooth_l1", "beta": -1}, "loss.beta", "-1 is not a positive number"),
])
def test_loss_parameters_are_checked(loss, field, words):
    refused(lambda: Spec.from_dict(spec_with(loss=loss)), field, words)


@pytest.mark.parametrize("act", [
    {"name": "elu", "alpha": -1.0}, {"name": "elu", "alpha": 0.0},  # torch accepts any finite alpha
    {"name": "leaky_relu", "negative_slope": -2.0}, {"name": "leaky_relu", "negative_slope": 0},
    {"name": "softplus", "beta": 0.5, "threshold": -5.0},  # torch accepts any threshold
    {"name": "hardtanh", "min_val": -0.25, "max_val": 3},
])
def test_parameters_torch_accepts_are_accepted(act):
    spec = Spec.from_dict(with_activation(act))
    assert spec.layers[0].activation.params == {k: float(v) for k, v in act.items() if k != "name"}


def test_the_rules_live_with_each_class_as_data():
    assert set(ACTIVATIONS["softplus"].constraints) == {"beta"}
    rule = ACTIVATIONS["softplus"].constraints["beta"]
    assert isinstance(rule, Rule) and rule.holds(0.5) and not rule.holds(0.0) and not rule.holds(-1.0)
    with pytest.raises(TypeError, match="unknown parameters"):  # a rule for a parameter the class lacks is a typo
        type("Typo", (Named,), {"defaults": {"beta": 1.0}, "constraints": {"bta": rule}})


def test_softplus_beta_0_through_the_command_line(capsys, tmp_path):
    text = json.dumps(with_activation({"name": "softplus", "beta": 0}))
    check_file(capsys, tmp_path, text, "layers[0].activation.beta: 0 is not a positive number")


# -- 3. impossible sizes ---------------------------------------------------------------------------
def test_a_terabyte_layer_is_refused_naming_the_layer_and_the_count():
    obj = spec_with(input_size=10**9)
    obj["layers"][0]["units"] = 10**9
    err = refused(lambda: Spec.from_dict(obj), "layers[0]", "1.0e+18 parameters (1000000000 × 1000000000")
    assert "too large" in str(err)


def test_the_total_over_all_layers_is_limited_too():
    side = math.isqrt(MAX_PARAMETERS) - 1000  # each layer fits on its own, three of them do not
    obj = spec_with(input_size=side)
    obj["layers"] = [{"type": "dense", "units": side, "activation": "relu", "bias": False}] * 3
    refused(lambda: Spec.from_dict(obj), "layers", "parameters in all is too large")


@pytest.mark.parametrize("path,value,field", [
    (("input_size",), 2**31 + 1, "input_size"),
    (("input_size",), 10**400, "input_size"),
    (("layers", 1, "units"), 10**12, "layers[1].units"),
])
def test_absurd_sizes_are_refused(path, value, field):
    obj = spec_with()
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    refused(lambda: Spec.from_dict(obj), field, "is too large")


def test_huge_spec_through_the_command_line(capsys, tmp_path):
    obj = spec_with(input_size=10**9)
    obj["layers"][0]["units"] = 10**9
    check_file(capsys, tmp_path, json.dumps(obj), "layers[0]: 1.0e+18 parameters")


@pytest.mark.parametrize("batch,words", [(10**12, "too many"), (0, "not positive"), (-3, "not positive"),
                                         (2.0, "not a whole number"), (True, "not a whole number")])
def test_batch_sizes_are_checked_before_anything_is_drawn(batch, words):
    spec = bp.example("seed-nielsen")
    refused(lambda: bp.random_batch(spec, np.random.default_rng(0), batch=batch), "batch", words)
    refused(lambda: bp.random_case(spec, 0, batch=batch), "batch", words)


def test_batch_limit_counts_the_widest_layer():
    obj = spec_with()
    obj["layers"][1]["units"] = 1000
    spec = Spec.from_dict(obj)
    err = refused(lambda: bp.random_case(spec, 0, batch=MAX_VALUES // 1000 + 1), "batch", "1000 (the widest layer)")
    assert f"at most {MAX_VALUES // 1000}" in str(err)
    assert bp.random_batch(spec, np.random.default_rng(0), batch=np.int64(3)).x.shape == (3, 4)


def test_draws_bigger_than_memory_are_refused(monkeypatch):
    import manual_bp.data as data

    monkeypatch.setattr(data, "_memory_bytes", lambda: 200)  # a machine with 200 bytes: seed-nielsen has 51 parameters
    spec = bp.example("seed-nielsen")
    refused(lambda: bp.init_params(spec, np.random.default_rng(0)), "layers", "of memory")
    refused(lambda: bp.random_batch(spec, np.random.default_rng(0), batch=100), "batch", "of memory")


def test_huge_batch_through_the_command_line(capsys):
    cli_refuses(capsys, ["check", "--example", "seed-nielsen", "--batch", 10**12, "--no-report"], "batch: ")


@pytest.mark.parametrize("seed", [-1, 2.5, True])
def test_bad_seeds(seed):
    refused(lambda: bp.random_case(bp.example("seed-nielsen"), seed), "seed", "")


def test_negative_seed_through_the_command_line(capsys):
    cli_refuses(capsys, ["check", "--example", "seed-nielsen", "--seed", -1, "--no-report"], "seed: ")


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), "2"])
def test_bad_scales(scale):
    refused(lambda: bp.init_params(bp.example("seed-nielsen"), np.random.default_rng(0), scale=scale), "scale")


# -- 4. complex, object, text and bool arrays are refused, never cast ---------------------------------
@pytest.fixture()
def case():
    spec = bp.example("seed-nielsen")
    return (spec, *bp.random_case(spec, 0, batch=3))


@pytest.mark.parametrize("dtype,words", [(np.complex128, "complex128 (complex numbers)"), (np.complex64, "complex64"),
                                         (object, "object (Python objects)"), (str, "(text)"), (bool, "bool (true/false")])
def test_ensure_real_refuses_what_is_not_a_real_number(dtype, words):
    err = refused(lambda: ensure_real("x", np.zeros(3).astype(dtype)), "x", words)
    assert "real" in err.fix


def test_ensure_real_passes_real_arrays_through_and_converts_lists():
    a = np.arange(3.0)
    assert ensure_real("x", a) is a
    assert ensure_real("y", [1, 2]).dtype.kind == "i"
    refused(lambda: ensure_real("x", [[1.0], [1.0, 2.0]]), "x", "not an array of numbers")


def test_complex_x_y_and_params_are_refused_by_the_validators(case):
    spec, params, x, y = case
    refused(lambda: check_x(spec, x + 1j), "x", "has dtype complex128")
    refused(lambda: check_y(spec, y + 1j, 3, False, np.dtype(np.float64)), "y", "has dtype complex128")
    refused(lambda: check_y(spec, y.astype(object), 3, False, np.dtype(np.float64)), "y", "has dtype object")
    field = "params['layers.1.weight']"
    refused(lambda: check_params(spec, {**params, "layers.1.weight": params["layers.1.weight"] + 0j}), field, "complex128")
    refused(lambda: bp.gradients(spec, params, x + 1j, y), "x", "complex128")


def test_class_targets_that_are_bools_are_refused():
    obj = spec_with(loss="cross_entropy")
    obj["layers"][-1]["activation"] = "identity"
    spec = Spec.from_dict(obj)
    err = refused(lambda: check_y(spec, np.array([True, False]), 2, False, np.dtype(np.float64)), "y", "bool")
    assert "class indices" in err.fix


def test_complex_data_is_refused_by_the_oracle_and_the_command_line(case, capsys, tmp_path):
    import oracle

    spec, params, x, y = case
    refused(lambda: oracle.check(spec, params, x + 1j, y, dtype="float64"), "x", "complex128")
    np.savez(tmp_path / "d.npz", x=x + 1j, y=y)
    cli_refuses(capsys, ["check", "--example", "seed-nielsen", "--data", tmp_path / "d.npz", "--no-report"], "x: has dtype complex128")


# -- 5. everything else an outside tester tried ------------------------------------------------------------
@pytest.mark.parametrize("field,value,words", [
    ("format_version", True, "True is not supported"),
    ("format_version", False, "False is not supported"),
    ("format_version", 1.0, "1.0 is not supported"),
    ("format_version", "1", "'1' is not supported"),
    ("input_size", 3.0, "3.0 is not an integer"),
    ("input_size", "3", "'3' is not an integer"),
    ("input_size", True, "True is not an integer"),
    ("input_size", None, "None is not an integer"),
    ("layers", {"type": "dense"}, "is not a non-empty list"),
    ("layers", "dense", "is not a non-empty list"),
    ("layers", [[1]], "is not an object"),
    ("name", "../../../etc", "holds '/'"),
    ("name", "a\nb", "holds '\\n'"),
    ("name", "x" * 300, "300 bytes long"),
    ("description", "\ud800", "lone surrogate"),
    ("description", 7, "is not a string"),
])
def test_top_level_fields(field, value, words):
    where = "layers[0]" if value == [[1]] else field
    refused(lambda: Spec.from_dict(spec_with(**{field: value})), where, words)


@pytest.mark.parametrize("units,words", [(0, "0 is not positive"), (-4, "-4 is not positive"), (2.0, "not an integer")])
def test_bad_units(units, words):
    obj = spec_with()
    obj["layers"][1]["units"] = units
    refused(lambda: Spec.from_dict(obj), "layers[1].units", words)


def test_layer_type_that_is_not_a_string():
    obj = spec_with()
    obj["layers"][0]["type"] = ["dense"]
    refused(lambda: Spec.from_dict(obj), "layers[0].type", "unknown layer type ['dense']")


def test_unknown_field_with_a_newline_stays_on_one_line(capsys, tmp_path):
    text = json.dumps(spec_with(**{"col\nour": 1}))
    refused(lambda: Spec.from_json(text), "'col\\nour'", "unknown field")
    check_file(capsys, tmp_path, text, "'col\\nour': unknown field")


def test_huge_values_in_messages_are_cut_short():
    err = refused(lambda: Spec.from_dict(spec_with(layers="x" * 10**6)), "layers", "is not a non-empty list")
    assert len(str(err)) < 200


@pytest.mark.parametrize("text,words", [
    ('{"format_version": ' + "1" * 5000 + "}", "not valid JSON"),
    ('{"format_version": 1, "input_size": 3, ', "not valid JSON"),
    (b'{"name": "r\xe9seau"}', "not UTF-8"),
    (b"\xff\xfe{\x00}\x00", "not UTF-8"),  # UTF-16
    ("[1, 2]", "the top level is a list, not an object"),
])
def test_files_that_are_not_a_spec(capsys, tmp_path, text, words):
    refused(lambda: Spec.from_json(text, source="in.json"), "in.json", words)
    check_file(capsys, tmp_path, text, words)


def test_a_byte_order_mark_is_allowed():
    text = json.dumps(BASE).encode("utf-8")
    assert Spec.from_json(b"\xef\xbb\xbf" + text) == Spec.from_json(text)


def test_paths_that_are_not_spec_files(capsys, tmp_path):
    refused(lambda: load_spec(tmp_path), str(tmp_path), "cannot be read")
    cli_refuses(capsys, ["check", tmp_path, "--no-report"], "cannot be read")
    refused(lambda: load_spec("a\0b"), "'a\\x00b'", "cannot be read")
    if Path("/dev/zero").exists():
        refused(lambda: load_spec("/dev/zero"), "/dev/zero", "is larger than")


# -- valid specs are untouched ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", bp.example_names())
def test_every_builtin_example_still_loads_identically(name, tmp_path):
    spec = bp.example(name)
    text = spec.to_json()
    assert Spec.from_json(text) == spec and Spec.from_json(text).to_json() == text
    assert Spec.from_dict(spec.to_dict()) == spec
    (tmp_path / "s.json").write_text(text, encoding="utf-8")
    again = load_spec(tmp_path / "s.json")
    assert again == spec and again.param_shapes() == spec.param_shapes() and again.to_json() == text


@pytest.mark.parametrize("name", ["foo", "complex128", "int64", 3, "[('a'"])
def test_unknown_dtypes_are_refused_not_read_as_float64(name):
    refused(lambda: bp.dtype_of(name), "dtype", "is not supported")
