"""``bp-oracle campaign``: reproducible from the seed with any number of workers, every distinct failure grouped,
shrunk and replayable, coverage that adds up, early stops, bad input."""

import json
import math
import os
import shlex
from pathlib import Path

import pytest
from hypothesis import strategies as st

from oracle import cli
from oracle.campaign import CHUNK, comparable, draw_case, draw_shard, html, run_campaign, spec_size
from oracle.graph import nodes
from oracle.strategies import specs

from .helpers import dense_backprop_source

# bug 1: sigmoid' taken at z instead of at sigmoid(z); bug 2: relu's mask dropped; bug 3: the bias gradient averaged
BUGS = dense_backprop_source(
    "manual_bp's dense backprop with three injected bugs, each visible only on some nets.",
    delta="g * z * (1 - z) if act.name == 'sigmoid' else g if act.name == 'relu' else act.vjp(z, a, g)",
    bias="delta.mean(axis=0)")

# nets where each bug shows alone: sigmoid hidden layers (no bias), relu hidden layers (no bias), identity with biases
THREE_KINDS = st.one_of(
    specs(min_depth=2, max_depth=3, max_width=6, activations=("sigmoid",), bias=False, losses=("mse",),
          output_activations=("identity",)),
    specs(min_depth=2, max_depth=3, max_width=6, activations=("relu",), bias=False, losses=("mse",),
          output_activations=("identity",)),
    specs(max_depth=3, max_width=6, activations=("identity",), bias=True, losses=("mse",), output_activations=("identity",)),
)


@pytest.fixture
def bugs(tmp_path) -> str:
    path = tmp_path / "bugs.py"
    path.write_text(BUGS)
    return f"{path}:grads"


def _report(folder, seed) -> dict:
    return json.loads((Path(folder) / f"campaign-{seed}" / "campaign.json").read_text(encoding="utf-8"))


def test_same_seed_same_report_with_one_or_two_workers(tmp_path):
    args = ["campaign", "--examples", str(CHUNK + 8), "--seed", "7", "--nets", "all", "--report", str(tmp_path)]
    assert cli.main(args) == 0
    first = _report(tmp_path, 7)
    assert first["schema"] == "bp-oracle/campaign" and first["schema_version"] == 1
    assert first["totals"]["cases"] == CHUNK + 8 and first["timing"]["workers"] == 1
    assert cli.main(args) == 0
    assert comparable(_report(tmp_path, 7)) == comparable(first)
    assert cli.main(args + ["--workers", "2"]) == 0   # two shards, one per worker process, merged in case order
    second = _report(tmp_path, 7)
    assert second["timing"]["workers"] == 2
    assert comparable(second) == comparable(first)
    folder = tmp_path / "campaign-7"
    assert {p.name for p in folder.iterdir()} >= {"campaign.json", "campaign.md", "campaign.html", "worst-error.png"}
    assert (folder / "worst-error.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_three_bugs_give_three_shrunk_replayable_groups(tmp_path, bugs, capsys):
    seed, regimes = 5, ("well_conditioned",)
    report = run_campaign(examples=40, seed=seed, nets="three-kinds", dtype="float64", impl=cli._start_impl(bugs, 60),
                          impl_name=bugs, report_dir=tmp_path, specs_strategy=THREE_KINDS, regimes=regimes,
                          progress=False, per_net=1)
    assert report["exit_code"] == 1
    groups = report["groups"]
    sigs = {(g["signature"]["layer"], g["signature"]["activation"]) for g in groups}
    assert len(groups) == 3 and sigs == {("dense", "sigmoid"), ("dense", "relu"), ("dense", "identity")}, groups
    assert sum(g["count"] for g in groups) == report["totals"]["failed"]
    bias = next(g for g in groups if g["signature"]["activation"] == "identity")
    assert bias["signature"]["hint"].startswith("constant ratio")  # 1/m: the mean where the sum belongs
    smaller = 0
    for g in groups:
        first = draw_case(seed, g["first_case"], nets="three-kinds", dtype="float64", strategy=THREE_KINDS,
                          regimes=regimes, per_net=1)
        shrunk = g["shrunk"]
        assert shrunk["reproduces"] and shrunk["how"] in ("shrunk", "data shrunk")
        n_first, p_first = spec_size(first.spec)
        assert shrunk["size"]["nodes"] <= n_first and shrunk["size"]["parameters"] <= p_first
        smaller += (shrunk["size"]["nodes"], shrunk["size"]["parameters"]) != (n_first, p_first)
        argv = shlex.split(g["replay"])
        assert argv[:2] == ["bp-oracle", "replay"] and "--impl" in argv
        assert cli.main(argv[1:]) == 1                       # the replay shows the bug again
        assert "Same verdict as recorded." in capsys.readouterr().out
    assert smaller >= 1  # the relu group's first case is 2 -> 2 relu -> 6 relu -> 5; it shrinks to 1 -> 1 relu -> 1
    md = (tmp_path / f"campaign-{seed}" / "campaign.md").read_text(encoding="utf-8")
    assert md.count("### Group ") == 3 and "replay" in md


def test_manual_bp_over_200_cases_passes_and_coverage_adds_up(tmp_path):
    seed = 3
    assert cli.main(["campaign", "--examples", "200", "--seed", str(seed), "--nets", "all", "--report", str(tmp_path)]) == 0
    report = _report(tmp_path, seed)
    totals, cov = report["totals"], report["coverage"]
    assert totals["cases"] == 200 and totals["failed"] == 0 and report["groups"] == [] and report["stopped_early"] is None
    judged = totals["passed"]
    assert judged + totals["refused"] == 200
    assert sum(map(sum, cov["matrix"])) == cov["layers_checked"] == sum(c["count"] for c in cov["cells"])
    assert sum(cov["losses"].values()) == sum(cov["regimes"].values()) == sum(cov["dtypes"].values()) == judged
    # the layers checked are every node of every case drawn (refused cases apart), counted again independently
    if totals["refused"] == 0:
        drawn = [d for k in range(math.ceil(200 / CHUNK)) for d in draw_shard(seed, "all", ("float64", "float32"), k)][:200]
        assert cov["layers_checked"] == sum(len(nodes(d.spec)) for d in drawn)
    assert report["timing"]["cases_per_second"] > 0
    assert report["worst_error"]["cells"] and all(c["worst"] >= 0 for c in report["worst_error"]["cells"])


def test_max_failures_and_time_budget_stop_early(tmp_path, bugs):
    args = ["campaign", "--examples", "100", "--seed", "1", "--nets", "dense", "--dtype", "float64", "--impl", bugs,
            "--report", str(tmp_path), "--shrink-seconds", "3"]
    assert cli.main(args + ["--max-failures", "1"]) == 1
    report = _report(tmp_path, 1)
    assert report["stopped_early"]["reason"] == "max_failures"
    assert report["totals"]["failed"] == 1 and report["totals"]["cases"] < 100 and len(report["groups"]) == 1
    assert "--max-failures 1" in report["command"]
    assert cli.main(["campaign", "--examples", "100000", "--seed", "1", "--nets", "dense", "--time-budget", "0.5",
                     "--no-report"]) == 0


@pytest.mark.parametrize("extra", [["--examples", "-1"], ["--workers", "0"], ["--max-failures", "0"],
                                   ["--time-budget", "0"], ["--time-budget", "nan"], ["--seed", "-1"],
                                   ["--per-net", "0"], ["--per-net", "5"], ["--per-net", "64"]])
def test_bad_input_exits_2_in_one_line(extra, capsys):
    assert cli.main(["campaign", "--no-report", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bp-oracle: error:") and "\n" not in err


def test_html_escapes_everything():
    report = {"seed": 0, "nets": "<b>nets</b>", "dtypes": ["float64"], "impl": "<script>alert(1)</script>",
              "command": "bp-oracle campaign --impl '<x>'", "stopped_early": None, "regimes": ["well_conditioned"],
              "totals": {"cases": 1, "passed": 0, "failed": 1, "refused": 0, "groups": 1,
                         "classifications": {"bug": 1}, "by_dtype": {"float64": {"bug": 1}}},
              "coverage": {"layers_checked": 1, "layer_types": ["dense"], "activations": ["relu"], "matrix": [[1]],
                           "cells": [], "losses": {"mse": 1}, "regimes": {"well_conditioned": 1}, "dtypes": {"float64": 1}},
              "worst_error": {"what": "w", "cells": []},
              "groups": [{"id": 1, "signature": {"layer": "dense", "activation": "relu", "loss": "mse",
                                                 "classification": "bug", "hint": "<img src=x onerror=alert(1)>"},
                          "count": 1, "first_case": 0, "first_summary": "<i>s</i>", "report": None, "replay": None,
                          "shrunk": {"note": "n", "describe": "<d>", "dtype": "float64", "regime": "r", "batch": 1,
                                     "data_seed": 0, "size": {"nodes": 1, "parameters": 1}, "reproduces": True}}],
              "timing": {"case_seconds": 1.0, "cases_per_second": 1.0, "workers": 1, "shrink_seconds": 0.0, "seconds": 1.0}}
    page = html(report, b"png")
    assert "<script>" not in page and "<img src=x" not in page and "<d>" not in page and "&lt;script&gt;" in page


def test_a_network_is_drawn_once_for_per_net_consecutive_cases():
    for per_net in (1, 4, 16):
        draws = draw_shard(11, "dense", ("float64", "float32"), 2, per_net=per_net)
        assert len(draws) == CHUNK
        groups = [draws[i:i + per_net] for i in range(0, CHUNK, per_net)]
        assert all(len({id(d.spec) for d in g}) == 1 and len({d.batch for d in g}) == 1 for g in groups)
        assert len({d.data_seed for d in draws}) == CHUNK  # each case its own weights and data
    # the cases' regimes, dtypes and data seeds come from the case index alone, whatever the grouping
    one, many = draw_shard(11, "dense", ("float64", "float32"), 2, per_net=1), draw_shard(11, "dense", ("float64", "float32"), 2)
    assert [(d.regime, d.dtype, d.data_seed) for d in one] == [(d.regime, d.dtype, d.data_seed) for d in many]


def test_default_workers_use_every_core_only_for_long_campaigns():
    from oracle.campaign import POOL_MIN_EXAMPLES, default_workers

    assert default_workers(POOL_MIN_EXAMPLES - 1) == 1
    assert default_workers(POOL_MIN_EXAMPLES) == len(os.sched_getaffinity(0))
