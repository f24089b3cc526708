"""main.py end to end on digits: report files, bad input, SIGTERM mid-generation and exact resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config=configs/quickstart.py", "--config.model=densenet-bc-10-4",
        "--config.num_generations=2", "--config.batch_size=32", "--config.steps_per_dispatch=1",
        "--config.checkpoint_every=10", "--config.log_every=10"]


def cmd(workdir, *extra, steps=20):
    return [sys.executable, "main.py", *TINY, f"--config.num_steps={steps}", f"--workdir={workdir}",
            *extra]


def run(args, **kw):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def strip_paths(results):
    return [{k: v for k, v in g.items() if k != "checkpoint"} for g in results["generations"]]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("e2e")
    proc = run(cmd(workdir, steps=60))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc


def test_end_to_end_writes_the_three_report_files(finished):
    workdir, proc = finished
    results = json.loads((workdir / "results.json").read_text())
    assert results["dataset"] == "digits"
    gens = results["generations"]
    assert [(g["index"], g["role"]) for g in gens] == [(0, "teacher"), (1, "student"), (2, "student")]
    assert all(g["model"] == "densenet-bc-10-4" and g["params"] > 0 for g in gens)
    assert all(0 <= g["test_error"] < 0.9 and g["test_nll"] > 0 for g in gens)  # it learned
    assert [e["members"] for e in results["ensembles"]] == [[1, 2], [0, 1, 2]]
    md = (workdir / "results.md").read_text()
    assert "Ens*2" in md and f"{100 * gens[1]['test_error']:.2f}" in md
    assert (workdir / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Ens*2" in proc.stdout  # the table is printed at the end
    for g in range(3):
        assert os.path.exists(workdir / f"gen_{g}/done.json")
        records = [json.loads(x) for x in (workdir / f"gen_{g}/metrics.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in records if "train/loss" in r) == 60
        assert [r["test/error"] for r in records if "test/error" in r] == [gens[g]["test_error"]]


def test_rerun_of_a_finished_workdir_trains_nothing(finished):
    workdir, _ = finished
    before = (workdir / "gen_1/metrics.jsonl").read_text()
    proc = run(cmd(workdir, steps=60))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (workdir / "gen_1/metrics.jsonl").read_text() == before


def test_sigterm_mid_generation_then_resume_equals_uninterrupted(finished, tmp_path):
    reference, _ = finished
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(cmd(workdir, steps=60), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (workdir / "gen_1/meta.json").exists():  # generation 1 is starting
        assert proc.poll() is None and time.time() < deadline, "run ended before generation 1"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Resume with:" in err and "generation 1" in err
    assert not (workdir / "gen_1/done.json").exists()
    assert os.listdir(workdir / "gen_1/checkpoints")  # the interrupted generation was saved

    proc = run(cmd(workdir, steps=60))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((workdir / "results.json").read_text())
    want = json.loads((reference / "results.json").read_text())
    assert strip_paths(got) == strip_paths(want)
    assert got["ensembles"] == want["ensembles"]


@pytest.mark.parametrize("extra,match", [
    (["--config.model=densenet-bc-11-4"], "densenet-bc-11-4"),
    (["--config.num_generations=0"], "num_generations=0"),
])
def test_bad_input_exits_2_with_one_line_before_any_work(tmp_path, extra, match):
    proc = run(cmd(tmp_path / "w", *extra))
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and match in last
    assert not (tmp_path / "w").exists()  # nothing was created


def test_batch_not_divisible_by_8_devices_exits_2(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = run(cmd(tmp_path / "w", "--config.batch_size=12"), env=env)
    assert proc.returncode == 2
    assert "12" in proc.stderr.strip().splitlines()[-1] and "8" in proc.stderr
