"""Tests for banjax.report: schema validation, the Markdown tables, JSON round trip, PNG output."""

import copy
import json
import os

import numpy as np
import pytest

from banjax import report


def gen(index, error, nll, model="densenet-bc-112-33", params=6_300_000):
    role = "teacher" if index == 0 else "student"
    return {"index": index, "role": role, "model": model, "params": params, "test_error": error,
            "test_nll": nll, "checkpoint": f"/work/ckpt/gen{index}"}


@pytest.fixture
def results():
    return {
        "dataset": "cifar100",
        "generations": [gen(0, 0.1825, 0.8), gen(1, 0.1761, 0.75), gen(2, 0.1722, 0.7),
                        gen(3, 0.1659, 0.69)],
        "ensembles": [
            {"members": [1, 2], "test_error": 0.1577, "test_nll": 0.61},
            {"members": [1, 2, 3], "test_error": 0.1568, "test_nll": 0.6},
            {"members": [0, 1, 2, 3], "test_error": 0.1512, "test_nll": 0.58},
        ],
    }


def curves():
    return {
        0: [{"step": s, "train/loss": 4.0 / (1 + s)} for s in range(0, 200, 20)]
        + [{"step": 200, "eval/error": 0.3}],
        1: [{"step": s, "train/loss": 3.0 / (1 + s), "eval/error": 0.5 - s / 1000}
            for s in range(0, 200, 20)],
    }


EXPECTED = """\
| Network | Params | Teacher | BAN-1 | BAN-2 | BAN-3 | Ens*2 | Ens*3 | Ens*3+T |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
| densenet-bc-112-33 | 6.30M | 18.25 | 17.61 | 17.22 | 16.59 | 15.77 | 15.68 | 15.12 |

| Generation | Role | Model | Params | Test error (%) | Test NLL |
| --- | --- | --- | --- | --- | --- |
| 0 | teacher | densenet-bc-112-33 | 6.30M | 18.25 | 0.8000 |
| 1 | student | densenet-bc-112-33 | 6.30M | 17.61 | 0.7500 |
| 2 | student | densenet-bc-112-33 | 6.30M | 17.22 | 0.7000 |
| 3 | student | densenet-bc-112-33 | 6.30M | 16.59 | 0.6900 |

| Ensemble members | Test error (%) | Test NLL |
| --- | --- | --- |
| 1+2 | 15.77 | 0.6100 |
| 1+2+3 | 15.68 | 0.6000 |
| 0+1+2+3 | 15.12 | 0.5800 |
"""


def test_markdown_table_paper_layout(results):
    assert report.markdown_table(results) == EXPECTED


def test_markdown_table_cross_architecture_and_order():
    res = {"dataset": "cifar100",
           "generations": [gen(1, 0.188, 0.9, "preresnet-14-0.5", 7_300_000),
                           gen(0, 0.1769, 0.85, "densenet-bc-90-60", 16_100_000)]}
    expected = (
        "| Network | Params | Teacher | BAN-1 |\n"
        "| --- | --- | --- | --- |\n"
        "| densenet-bc-90-60 -> preresnet-14-0.5 | 16.10M -> 7.30M | 17.69 | 18.80 |\n"
        "\n"
        "| Generation | Role | Model | Params | Test error (%) | Test NLL |\n"
        "| --- | --- | --- | --- | --- | --- |\n"
        "| 0 | teacher | densenet-bc-90-60 | 16.10M | 17.69 | 0.8500 |\n"
        "| 1 | student | preresnet-14-0.5 | 7.30M | 18.80 | 0.9000 |\n"
    )
    assert report.markdown_table(res) == expected


@pytest.mark.parametrize("path,value,field", [
    (("dataset",), "", "dataset"),
    (("generations", 1, "test_error"), 1.5, r"generations\[1\].test_error"),
    (("generations", 2, "test_nll"), float("nan"), r"generations\[2\].test_nll"),
    (("generations", 0, "role"), "student", r"generations\[0\].role"),
    (("generations", 1, "role"), "ta", r"generations\[1\].role"),
    (("generations", 3, "params"), -1, r"generations\[3\].params"),
    (("generations", 3, "index"), 2, "distinct"),
    (("generations", 0, "model"), None, r"generations\[0\].model"),
    (("ensembles", 0, "members"), [1, 7], r"ensembles\[0\].members"),
    (("ensembles", 1, "members"), [1, 1], r"ensembles\[1\].members"),
    (("ensembles", 2, "test_error"), "0.1", r"ensembles\[2\].test_error"),
])
def test_validation_errors_name_the_field(results, path, value, field):
    bad = copy.deepcopy(results)
    target = bad
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    with pytest.raises(ValueError, match=field):
        report.validate_results(bad)


def test_validation_missing_teacher_and_empty(results):
    with pytest.raises(ValueError, match="generations"):
        report.validate_results({"dataset": "x", "generations": []})
    with pytest.raises(ValueError, match="index 0"):
        report.validate_results({"dataset": "x", "generations": [gen(1, 0.1, 0.1)]})
    report.validate_results({"dataset": "x", "generations": [gen(0, 0.1, 0.1)]})


def test_write_report_round_trip_and_png(tmp_path, results):
    results["generations"][1]["test_nll"] = np.float32(0.75)  # NumPy scalars are accepted
    paths = report.write_report(str(tmp_path), results, curves())
    assert paths == {k: str(tmp_path / f"results.{k}") for k in ("json", "md", "png")}
    with open(paths["json"]) as f:
        loaded = json.load(f)
    assert loaded == json.loads(json.dumps(results, default=float))
    assert loaded["generations"][0]["test_error"] == 0.1825
    md = open(paths["md"]).read()
    assert EXPECTED in md and "results.png" in md
    png = open(paths["png"], "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert sorted(os.listdir(tmp_path)) == ["results.json", "results.md", "results.png"]


def test_plot_without_curves(tmp_path, results):
    results["ensembles"] = []
    path = tmp_path / "single.png"
    report.plot(results, None, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_validation_does_not_clobber(tmp_path, results):
    report.write_report(str(tmp_path), results)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    bad = copy.deepcopy(results)
    bad["generations"][2]["test_error"] = 17.22  # percent instead of a fraction
    with pytest.raises(ValueError, match="test_error"):
        report.write_report(str(tmp_path), bad)
    with pytest.raises(ValueError, match="step"):
        report.write_report(str(tmp_path), results, {0: [{"train/loss": 1.0}]})
    after = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    assert after == before


def test_failure_mid_write_keeps_old_report_and_no_temp_files(tmp_path, results, monkeypatch):
    report.write_report(str(tmp_path), results)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}

    def broken_plot(results, curves, path):
        with open(path, "wb") as f:
            f.write(b"half a png")
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "plot", broken_plot)
    changed = copy.deepcopy(results)
    changed["dataset"] = "cifar10"
    with pytest.raises(RuntimeError, match="disk full"):
        report.write_report(str(tmp_path), changed)
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before
