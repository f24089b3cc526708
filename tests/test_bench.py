"""Benchmark tool: measure() fields, compare() ratios, the CLI's JSON, the shrunk GPU-set script."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from banjax import bench, data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = bench.Setup(model="wrn-10-1", batch=8, image_size=8, channels=1, num_classes=10,
                   bank_views=3)


def taps(size, k, stride):
    """In-bounds kernel taps summed over output positions along one axis (padding k // 2)."""
    out = (size + 2 * (k // 2) - k) // stride + 1
    idx = np.arange(out)[:, None] * stride - k // 2 + np.arange(k)[None, :]
    return int(((idx >= 0) & (idx < size)).sum())


def wrn_flops(batch, size, cin, classes):
    """(all, stem) forward FLOPs (2 x multiply-adds) of wrn-10-1's convolutions and classifier.

    Like XLA's cost analysis, only taps inside the image count (none on the zero padding).
    """
    stem = taps(size, 3, 1) ** 2 * cin * 16
    macs, c, s = stem, 16, size
    for stage, out in enumerate((16, 32, 64)):
        stride = 2 if stage else 1
        macs += taps(s, 3, stride) ** 2 * c * out
        if c != out or stride > 1:
            macs += taps(s, 1, stride) ** 2 * c * out  # 1x1 projection shortcut
        s = (s - 1) // stride + 1
        macs += taps(s, 3, 1) ** 2 * out * out
        c = out
    macs += c * classes
    return 2 * macs * batch, 2 * stem * batch


@pytest.fixture(scope="module")
def measured():
    return bench.measure(TINY, steps=2, repeats=2, fast_compile=True)


def test_measure_returns_sane_fields(measured):
    r = measured
    assert r["compile_s"] > 0 and r["xla_compile_s"] > 0 and r["lower_s"] > 0
    times = r["step_s_all"]
    assert len(times) == 2 and all(t > 0 for t in times)
    assert r["step_s_median"] == pytest.approx(np.median(times))
    order = ("step_s_min", "step_s_q25", "step_s_median", "step_s_q75", "step_s_max")
    assert [r[k] for k in order] == sorted(r[k] for k in order)
    assert r["images_per_s"] == pytest.approx(TINY.batch / r["step_s_median"])
    # forward + backward (input and weight gradients, none for the images) of every conv and the
    # classifier, plus a small rest (BatchNorm, ReLU, loss, optimiser, augmentation)
    fwd, stem = wrn_flops(TINY.batch, TINY.image_size, TINY.channels, TINY.num_classes)
    assert 3 * fwd - stem <= r["flops_per_step"] <= 1.2 * (3 * fwd - stem)
    assert r["flop_per_s"] == pytest.approx(r["flops_per_step"] / r["step_s_median"])
    assert 0 < r["dispatch_s"] < r["step_s_max"]
    assert r["peak_memory_bytes"] > 0 and r["program_memory"]["argument_bytes"] > 0
    n, k, c = 16 * TINY.batch, TINY.bank_views, TINY.num_classes
    assert r["bank_shape"] == [n, k, c]
    assert r["bank_bytes"] == n * k * c * 2 and r["bank_view_ids_bytes"] == n * k * 2
    assert r["bank_full_cifar100_bytes"] == 50000 * 162 * 100 * 2
    assert r["setup"]["model"] == "wrn-10-1" and r["num_params"] > 0
    json.dumps(r)  # JSON-able as is


def test_compare_returns_the_four_ratios_and_no_recompilation():
    r = bench.compare(TINY, steps=2, repeats=2, fuse=2, fast_compile=True)
    for part, key in (("teacher", "bank_over_online"), ("fusion", "fused_speedup"),
                      ("dtype", "bf16_over_f32"), ("remat", "remat_time_ratio")):
        a, b = r[part]["a"], r[part]["b"]
        paired = np.median(np.asarray(a["step_s_all"]) / np.asarray(b["step_s_all"]))
        want = 1 / paired if part == "fusion" else paired
        assert r[part][key] == pytest.approx(want) and math.isfinite(want) and want > 0
    t = r["teacher"]
    assert (t["a"]["setup"]["teacher"], t["b"]["setup"]["teacher"]) == ("bank", "online")
    # the online step adds one inference-mode forward of the teacher: about a third of a train step
    assert 1.15 < t["b"]["flops_per_step"] / t["a"]["flops_per_step"] < 1.5
    f = r["fusion"]
    assert f["a"]["setup"]["steps_per_dispatch"] == 2 and f["b"]["setup"]["steps_per_dispatch"] == 1
    assert f["a"]["flops_per_step"] == pytest.approx(f["b"]["flops_per_step"], rel=0.05)
    assert 0 < f["dispatch_s"] < f["b"]["step_s_median"]
    d, t1 = f["dispatch_s"], f["b"]["step_s_median"]
    assert f["speedup_bound"] == pytest.approx(t1 / (t1 - d + d / 2))
    assert r["dtype"]["a"]["setup"]["dtype"] == "bfloat16"
    m = r["remat"]
    assert r["remat"]["remat_temp_ratio"] == pytest.approx(
        m["a"]["program_memory"]["temp_bytes"] / m["b"]["program_memory"]["temp_bytes"])
    check = r["recompile_check"]
    assert check["compiles"][0] >= 1 and check["traces"][0] >= 1
    assert check["recompiles"] == 0 and check["traces"][1] == 0
    for name, target in r["targets"].items():
        v = target["value"]
        want = {"bank_over_online<=0.85": v <= 0.85, "fused_speedup>=2": v >= 2,
                "recompiles==0": v == 0}[name]
        assert target["met"] == want
    assert "target recompiles==0: 0.000 -> met" in bench.format_compare(r)


def test_scan_loop_detection_reads_the_entry_computation():
    body = ('%body {\n  %w = (s32[]) while(%t), backend_config={"known_trip_count":{"n":"4"}}\n}\n')
    loop = ('\nENTRY %main {\n  %w = (s32[]) while(%t), backend_config={"known_trip_count":'
            '{"n":"4"}}\n}\n')
    assert bench.scan_loop(body + loop, 4)
    assert not bench.scan_loop(body + "\nENTRY %main {\n  %a = f32[] add(%x, %y)\n}\n", 4)
    assert not bench.scan_loop(body + loop, 1)


def test_views_match_the_datasets_and_bad_input_is_rejected():
    assert bench.views_for(32) == data.views_for("cifar100")
    assert bench.views_for(8) == data.views_for("digits")
    cases = ((dict(teacher="oracle"), "teacher='oracle'.*bank"),
             (dict(dtype="float16"), "dtype='float16'.*bfloat16"),
             (dict(bank_views=200), "bank_views=200.*1..162"),
             (dict(num_train=4), "num_train=4.*batch=64"),
             (dict(model="resnet-9"), "resnet-9"))
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            bench.validate(bench.Setup(**kwargs))
    with pytest.raises(ValueError, match="repeats=0"):
        bench.validate(bench.Setup(), steps=1, repeats=0)
    with pytest.raises(ValueError, match="fuse=1"):
        bench.compare(TINY, fuse=1)


def test_cli_writes_json_and_reports_bad_input(tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["--model", "wrn-10-1", "--batch", "8", "--image-size", "8", "--num-classes",
            "10", "--teacher", "online", "--steps", "1", "--repeats", "1", "--fast-compile",
            "--json", str(out)]
    proc = subprocess.run([sys.executable, "-m", "banjax.bench", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["setup"]["teacher"] == "online" and r["setup"]["model"] == "wrn-10-1"
    assert r["bank_bytes"] == 0 and r["step_s_median"] > 0 and r["flops_per_step"] > 0
    assert "images/s" in proc.stdout and "GFLOP/s" in proc.stdout
    assert bench.main(["--teacher-model", "vgg-16"]) == 2
    assert "vgg-16" in capsys.readouterr().err


def test_shrunk_gpu_set_script_prints_its_table(tmp_path):
    out = tmp_path / "set.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/run_set.py", "--shrink", "--models", "wrn-28-10", "--json",
         str(out)], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = proc.stdout[proc.stdout.index("benchmark set (shrunk)"):].splitlines()
    rows = [ln.split() for ln in table[3:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("wrn-10-1", t, d) for t in ("bank", "online") for d in ("float32", "bfloat16")]
    result = json.loads(out.read_text())
    assert result["shrink"] and len(result["rows"]) == 4
    assert all(r["step_s_median"] > 0 and r["flops_per_step"] > 0 for r in result["rows"])
