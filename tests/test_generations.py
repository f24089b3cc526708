"""The generation chain: input validation, workdir config guard, teacher from a checkpoint, transplant."""

import json
import os

import jax
import numpy as np
import pytest

from banjax import bank, data, generations, models, train
from configs import ban_densenet, ban_resnet, quickstart
from tests.tiny import device_arrays, digits


def tiny_config(**overrides):
    c = quickstart.get_config()
    c.model = "densenet-bc-10-4"
    c.num_generations = 1
    c.num_steps = 6
    c.batch_size = 32
    c.steps_per_dispatch = 1
    c.checkpoint_every = 3
    c.update(overrides)
    return c


@pytest.fixture(scope="module")
def env():
    ds = digits()
    mesh = data.make_mesh()
    return ds, mesh, device_arrays(ds, mesh)


@pytest.mark.parametrize("field,value,match", [
    ("model", "densenet-bc-11-4", "densenet-bc-11-4"),
    ("model", "vgg-16", "vgg-16"),
    ("student_model", "wrn-27-2", "wrn-27-2"),
    ("dataset", "imagenet", "imagenet.*digits"),
    ("num_generations", 0, "num_generations=0"),
    ("temperature", 0.0, "temperature=0.0"),
    ("temperature", -1.0, "temperature=-1.0"),
    ("loss", "kd", "kd.*ban\\+l"),
    ("teacher_signal", "oracle", "oracle"),
    ("bank_views", 10, "bank_views=10.*1..9"),
    ("bank_dtype", "int8", "int8"),
    ("dtype", "float16", "float16"),
    ("teacher_checkpoint", "/nonexistent/ckpt", "/nonexistent/ckpt"),
    ("batch_size", 0, "batch_size=0"),
])
def test_bad_input_is_refused_with_the_bad_value(env, field, value, match):
    ds, mesh, _ = env
    c = tiny_config(**{field: value})
    with pytest.raises(ValueError, match=match):
        generations.validate(c, mesh, ds)


def test_batch_not_divisible_by_devices_is_refused():
    class EightDevices:  # only the device count matters to the check
        size = 8
        devices = np.zeros(8)
        shape = {"data": 8}
    with pytest.raises(ValueError, match="12"):
        data.check_batch(12, EightDevices())


def test_paper_configs_validate_and_name_the_paper_nets(env):
    _, mesh, _ = env
    for arg in ("112-33", "90-60", "80-80", "80-120"):
        c = ban_densenet.get_config(arg)
        generations.validate(c, mesh)
        assert c.model == f"densenet-bc-{arg}" and c.batch_size == 128 and c.optimizer.nesterov
    r = ban_resnet.get_config()
    generations.validate(r, mesh)
    assert r.model == "densenet-bc-90-60" and r.transplant and r.student_model != r.model


def test_workdir_with_another_config_is_refused_and_untouched(tmp_path):
    c = tiny_config()
    generations.prepare_workdir(c, str(tmp_path))
    before = (tmp_path / "config.json").read_text()
    generations.prepare_workdir(tiny_config(log_every=7), str(tmp_path))  # runtime-only: accepted
    with pytest.raises(generations.ConfigMismatch, match=r"temperature: 1.0 -> 4.0"):
        generations.prepare_workdir(tiny_config(temperature=4.0), str(tmp_path))
    assert (tmp_path / "config.json").read_text() == before


def test_chain_records_links_and_teacher_checkpoint_skips_training(env, tmp_path):
    ds, mesh, arrays = env
    c = tiny_config(num_generations=2)
    train.TRACES.clear()
    gens = generations.run_chain(c, str(tmp_path / "a"), ds, arrays, mesh)
    assert [g.index for g in gens] == [0, 1, 2]
    # Students 1 and 2 share an architecture: one compilation of the bank step serves both.
    assert train.TRACES[("train", "bank", 1)] == 1 and train.TRACES[("train", "none", 1)] == 1
    meta1 = json.loads((tmp_path / "a/gen_1/meta.json").read_text())
    banked = bank.load(str(tmp_path / "a/gen_0"))
    assert meta1["teacher"] == {"generation": 0, "checkpoint_step": 6,
                                "bank_checksum": banked["checksum"]}
    assert meta1["config_hash"] == generations.config_hash(c)
    assert banked["logits"].shape == (len(ds.train_labels), 9, 10)  # all 9 digit views
    assert meta1["seed"] != json.loads((tmp_path / "a/gen_0/meta.json").read_text())["seed"]
    assert not bank.exists(str(tmp_path / "a/gen_2"))  # the last generation teaches nobody

    # A new chain whose teacher is the first chain's generation 0: nothing is trained for it.
    c2 = tiny_config(teacher_checkpoint=str(tmp_path / "a/gen_0/checkpoints"))
    g0 = generations.run_generation(c2, str(tmp_path / "b"), 0, ds, arrays, mesh, None)
    records = [json.loads(x) for x in (tmp_path / "b/gen_0/metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if "train/loss" in r]  # evaluated, never trained
    assert g0.test_error == gens[0].test_error and g0.test_nll == gens[0].test_nll
    c3 = tiny_config(model="densenet-bc-16-4", teacher_checkpoint=c2.teacher_checkpoint)
    with pytest.raises(generations.ConfigMismatch, match="does not hold a densenet-bc-16-4"):
        generations.run_generation(c3, str(tmp_path / "c"), 0, ds, arrays, mesh, None)


def test_students_of_another_family_take_over_teacher_layers(env, tmp_path):
    ds, mesh, arrays = env
    c = tiny_config(student_model="preact-resnet-8", transplant=True)
    gens = generations.run_chain(c, str(tmp_path), ds, arrays, mesh)
    teacher, student = gens
    t = generations.nnx.merge(teacher.graphdef, teacher.params, teacher.rest)
    s = generations.nnx.merge(student.graphdef, student.params, student.rest)
    assert isinstance(s.stem.kernel, models.Frozen) and isinstance(s.head.kernel, models.Frozen)
    np.testing.assert_array_equal(np.asarray(s.stem.kernel.value), np.asarray(t.stem.kernel.value))
    np.testing.assert_array_equal(np.asarray(s.head.kernel.value), np.asarray(t.head.kernel.value))
    assert os.path.exists(tmp_path / "gen_1/done.json")


def test_bfloat16_chain_end_to_end(env, tmp_path):
    ds, mesh, arrays = env
    c = tiny_config(dtype="bfloat16", bank_dtype="bfloat16")
    gens = generations.run_chain(c, str(tmp_path), ds, arrays, mesh)
    banked = bank.load(str(tmp_path / "gen_0"))
    assert banked["dtype"] == "bfloat16" and np.isfinite(banked["logits"].astype(np.float32)).all()
    for g in gens:
        assert all(x.dtype == np.float32 for x in jax.tree.leaves(g.params))
        assert np.isfinite(g.test_nll)
    ref = generations.run_generation(tiny_config(), str(tmp_path / "fp32"), 0, ds, arrays, mesh, None)
    np.testing.assert_allclose(gens[0].test_nll, ref.test_nll, rtol=0.05)  # bf16 tracks fp32
