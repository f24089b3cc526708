"""The Born-Again chain: generation 0 (the teacher) on labels, generation k distilled from k-1.

Work directory layout (everything a rerun needs to go on where it stopped):
  config.json            the config the workdir was created with (a different one is refused)
  gen_K/meta.json        generation K's model, seed, config hash and its teacher (generation, checkpoint
                         step, bank checksum)
  gen_K/checkpoints/     Orbax checkpoints of generation K
  gen_K/metrics.jsonl    training metrics (and TensorBoard events beside it)
  gen_K/bank_*           generation K's logit bank (teacher signal of generation K+1)
  gen_K/done.json        written last: generation K is finished; reruns skip it
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from banjax import bank, data, logs, losses, models, train

RUNTIME_KEYS = ("log_every",)  # may change between reruns of one workdir
DTYPES = ("float32", "bfloat16")
SIGNALS = ("bank", "online")


class ConfigMismatch(ValueError):
    """The workdir was created with another config."""


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_dict(config) -> dict:
    """The config as plain JSON-able data, runtime-only keys dropped."""
    d = json.loads(config.to_json_best_effort(sort_keys=True))
    return {k: v for k, v in d.items() if k not in RUNTIME_KEYS}


def config_hash(config) -> str:
    """Short sha256 of the config (runtime-only keys excluded)."""
    return hashlib.sha256(json.dumps(config_dict(config), sort_keys=True).encode()).hexdigest()[:16]


def config_diff(old: dict, new: dict) -> list[str]:
    """Human-readable differences `key: old -> new`."""
    a, b = _flat(old), _flat(new)
    return [f"{k}: {a.get(k, '<missing>')!r} -> {b.get(k, '<missing>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<missing>") != b.get(k, "<missing>")]


def student_spec(config) -> str:
    """The students' architecture (the teacher's when unset)."""
    return config.student_model or config.model


def seed_for(config, generation: int) -> int:
    """A fresh, reproducible seed per generation."""
    return int(np.random.SeedSequence([config.seed, generation]).generate_state(1)[0])


def validate(config, mesh, ds: data.Dataset | None = None) -> None:
    """Every check that can fail before work starts; ValueError naming the bad value."""
    if config.dataset not in data.DATASETS:
        raise ValueError(f"dataset {config.dataset!r} is unknown; valid: {', '.join(data.DATASETS)}")
    models.parse_spec(config.model)
    models.parse_spec(student_spec(config))
    if config.num_generations < 1:
        raise ValueError(f"num_generations={config.num_generations}: need at least 1 student")
    for name in ("batch_size", "eval_batch_size"):
        if config[name] < 1:
            raise ValueError(f"{name}={config[name]} must be positive")
        data.check_batch(config[name], mesh)
    if not config.temperature > 0:
        raise ValueError(f"temperature={config.temperature} must be > 0")
    if config.loss not in losses.MODES:
        raise ValueError(f"loss={config.loss!r}; valid: {', '.join(losses.MODES)}")
    if config.teacher_signal not in SIGNALS:
        raise ValueError(f"teacher_signal={config.teacher_signal!r}; valid: {', '.join(SIGNALS)}")
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype={config.dtype!r}; valid: {', '.join(DTYPES)}")
    bank.check_dtype(config.bank_dtype)
    train.learning_rate(train.opt_config(config, 1))
    if config.steps_per_dispatch < 1:
        raise ValueError(f"steps_per_dispatch={config.steps_per_dispatch} must be >= 1")
    if config.teacher_checkpoint and not os.path.isdir(config.teacher_checkpoint):
        raise ValueError(f"teacher_checkpoint {config.teacher_checkpoint!r} does not exist (expected "
                         "a generation's checkpoints/ directory, e.g. runs/x/gen_0/checkpoints)")
    if ds is not None:
        total = ds.views.num_views
        if not 0 <= config.bank_views <= total:
            raise ValueError(f"bank_views={config.bank_views}: must be 0 (all) or 1..{total}, the "
                             f"size of {ds.name}'s view set")
        if len(ds.train_labels) < config.batch_size:
            raise ValueError(f"batch_size={config.batch_size} exceeds the {len(ds.train_labels)} "
                             "training examples")


def prepare_workdir(config, workdir: str) -> None:
    """Create the workdir with its config, or check that an existing one used this config."""
    path = os.path.join(workdir, "config.json")
    new = config_dict(config)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = config_diff(old, new)
        if diff:
            raise ConfigMismatch(f"workdir {workdir} was created with a different config; nothing "
                                 f"was changed. Differences (workdir -> now): {'; '.join(diff)}. "
                                 "Use a new --workdir or the original config.")
        return
    os.makedirs(workdir, exist_ok=True)
    _write_json(path, new)


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


@dataclasses.dataclass
class Generation:
    """A finished generation: its model (split), scores and where it is stored."""

    index: int
    spec: str
    graphdef: Any
    params: Any
    rest: Any
    num_params: int
    test_error: float
    test_nll: float
    checkpoint: str
    step: int

    def summary(self) -> dict:
        return {"index": self.index, "role": "teacher" if self.index == 0 else "student",
                "model": self.spec, "params": self.num_params, "test_error": self.test_error,
                "test_nll": self.test_nll, "checkpoint": self.checkpoint}


def total_steps(config, num_train: int) -> int:
    """Training steps of one generation: num_steps if set, else epochs x steps per epoch."""
    if config.num_steps > 0:
        return config.num_steps
    return config.num_epochs * (num_train // config.batch_size)


def _create(config, spec: str, ds: data.Dataset, seed: int, teacher: Generation | None):
    kwargs = dict(dtype=jnp.dtype(config.dtype), remat=config.remat, dropout=config.dropout,
                  in_channels=ds.train_images.shape[-1])
    t_model = None
    if teacher is not None and config.transplant:
        t_model = nnx.merge(teacher.graphdef, teacher.params, teacher.rest)
        kwargs.update(stem_features=t_model.stem.kernel.shape[-1],
                      head_features=t_model.head.kernel.shape[0])
    model = models.create(spec, ds.num_classes, rngs=nnx.Rngs(seed), **kwargs)
    if t_model is not None:
        models.transplant(model, t_model)
    return model


def run_generation(config, workdir: str, index: int, ds: data.Dataset, arrays, mesh,
                   teacher: Generation | None, *, resume_hint: str = "") -> Generation:
    """Train (or resume, or skip if finished) generation `index`; build its bank if a student needs it."""
    gen_dir = os.path.join(workdir, f"gen_{index}")
    os.makedirs(gen_dir, exist_ok=True)
    spec = config.model if index == 0 else student_spec(config)
    seed = seed_for(config, index)
    model = _create(config, spec, ds, seed, teacher)
    num_params = models.param_count(model)
    logging.info("gen %d: %s, %s parameters, seed %d", index, spec, f"{num_params:,}", seed)
    steps = total_steps(config, len(ds.train_labels))
    opt = train.opt_config(config, steps)
    graphdef, state = train.init_state(model, opt, seed)
    mngr = train.checkpoint_manager(os.path.join(gen_dir, "checkpoints"))
    use_bank = teacher is not None and config.teacher_signal == "bank"
    teacher_dir = None if teacher is None else os.path.join(workdir, f"gen_{teacher.index}")
    meta = {"generation": index, "model": spec, "seed": seed, "config_hash": config_hash(config),
            "teacher": None if teacher is None else {
                "generation": teacher.index, "checkpoint_step": teacher.step,
                "bank_checksum": bank.read_meta(teacher_dir)["checksum"] if use_bank else None}}
    meta_path = os.path.join(gen_dir, "meta.json")
    if os.path.exists(meta_path):
        old = _read_json(meta_path)
        if old != meta:
            raise ConfigMismatch(f"{gen_dir}/meta.json records {old}, but this run would make {meta}; "
                                 "the chain it belongs to changed. Use a new --workdir.")
    else:
        _write_json(meta_path, meta)

    restored = train.restore(mngr, state, mesh)
    if restored is None and index == 0 and config.teacher_checkpoint:
        restored = _load_teacher(config, state, mesh, spec, ds)
        train.save(mngr, restored)
    if restored is not None:
        state = jax.device_put(restored, data.replicated(mesh))
    if index == 0 and config.teacher_checkpoint:
        steps = int(state.step)  # a loaded teacher is not trained further
    checkpoint = os.path.join(gen_dir, "checkpoints")
    done_path = os.path.join(gen_dir, "done.json")
    if os.path.exists(done_path):  # finished: its scores are on record, nothing to recompute
        done = _read_json(done_path)
        logging.info("gen %d: finished earlier (step %d), skipped", index, done["step"])
        mngr.close()
        return Generation(index, spec, graphdef, state.params, state.rest, num_params,
                          done["test_error"], done["test_nll"], checkpoint, int(state.step))

    if int(state.step) < steps:
        if int(state.step):
            logging.info("gen %d: resuming from step %d", index, int(state.step))
        step_cfg = train.StepConfig(
            batch=config.batch_size, num_train=len(ds.train_labels), views=ds.views, opt=opt,
            teacher="none" if teacher is None else config.teacher_signal, mode=config.loss,
            temperature=config.temperature, label_weight=config.label_weight,
            kl_weight=config.kl_weight, dtype=config.dtype, steps=config.steps_per_dispatch)
        t_payload, t_graphdef = None, None
        if use_bank:
            t_payload = bank.to_device(bank.load(teacher_dir), mesh)  # verifies the checksum
        elif teacher is not None:
            t_graphdef = train.to_eval(teacher.graphdef, teacher.params, teacher.rest)
            t_payload = {"params": teacher.params, "rest": teacher.rest}
        writer = logs.MetricWriter(gen_dir)
        progress = logs.Progress(steps, initial=int(state.step), desc=f"gen {index}",
                                 every=config.log_every)
        try:
            state = train.fit(graphdef, state, step_cfg, arrays, mesh, total_steps=steps, mngr=mngr,
                              checkpoint_every=config.checkpoint_every, teacher=t_payload,
                              teacher_graphdef=t_graphdef, name=f"generation {index}",
                              writer=writer, progress=progress, log_every=config.log_every,
                              resume_hint=resume_hint)
        finally:
            progress.close()
            writer.close()

    scores = train.evaluate(graphdef, state.params, state.rest, arrays, len(ds.test_labels),
                            config.eval_batch_size, mesh, dtype=config.dtype)
    gen = Generation(index, spec, graphdef, state.params, state.rest, num_params,
                     scores["error"], scores["nll"], checkpoint, int(state.step))
    with logs.MetricWriter(gen_dir) as writer:
        writer.write(gen.step, {"error": gen.test_error, "nll": gen.test_nll}, prefix="test/")
    if config.teacher_signal == "bank" and index < config.num_generations and not bank.exists(gen_dir):
        _build_bank(config, gen, ds, arrays, mesh, gen_dir)
    _write_json(done_path, {**gen.summary(), "step": gen.step, "seed": seed})
    logging.info("gen %d (%s, %d params): test error %.4f, NLL %.4f", index, spec, num_params,
                 gen.test_error, gen.test_nll)
    mngr.close()
    return gen


def _load_teacher(config, state: train.TrainState, mesh, spec: str, ds: data.Dataset):
    """Generation 0 restored from config.teacher_checkpoint (another run's checkpoints/ dir)."""
    src = train.checkpoint_manager(config.teacher_checkpoint)
    try:
        restored = train.restore(src, state, mesh)
    except Exception as e:  # Orbax reports structure/shape mismatches in many ways
        raise ConfigMismatch(f"teacher_checkpoint {config.teacher_checkpoint!r} does not hold a "
                             f"{spec} for {ds.name} ({type(e).__name__}: {e})") from e
    if restored is None:
        raise ValueError(f"teacher_checkpoint {config.teacher_checkpoint!r} has no checkpoint")
    logging.info("gen 0: teacher loaded from %s (step %d)", config.teacher_checkpoint,
                 int(restored.step))
    return restored


def _build_bank(config, gen: Generation, ds: data.Dataset, arrays, mesh, gen_dir: str) -> None:
    key = jax.random.PRNGKey(seed_for(config, gen.index) + 1)
    table = bank.view_table(key, len(ds.train_labels), ds.views, config.bank_views)
    t0 = time.perf_counter()
    b = bank.build(gen.graphdef, gen.params, gen.rest, arrays, table, ds.views, mesh,
                   batch=config.eval_batch_size, dtype=config.bank_dtype,
                   compute_dtype=config.dtype)
    meta = bank.save(gen_dir, b)
    logging.info("gen %d: logit bank %s %s (%.1f MB) built in %.1f s", gen.index, meta["shape"],
                 meta["dtype"], meta["bytes"] / 1e6, time.perf_counter() - t0)


def device_arrays(ds: data.Dataset, mesh) -> dict:
    """The dataset on device (replicated) with its normalisation constants."""
    arrays = data.device_put_dataset(ds, mesh)
    rep = data.replicated(mesh)
    arrays["mean"] = jax.device_put(jnp.asarray(ds.mean, jnp.float32), rep)
    arrays["std"] = jax.device_put(jnp.asarray(ds.std, jnp.float32), rep)
    return arrays


def run_chain(config, workdir: str, ds: data.Dataset, arrays, mesh, *, resume_hint: str = ""
              ) -> list[Generation]:
    """Teacher + config.num_generations students, each resumable; returns every generation."""
    prepare_workdir(config, workdir)
    gens: list[Generation] = []
    with train.STOP as flag:
        for index in range(config.num_generations + 1):
            if flag.signum is not None:
                raise train.Interrupted(flag.signum, f"stopped by signal {flag.signum} before "
                                        f"generation {index}. Resume with: {resume_hint}")
            teacher = gens[-1] if gens else None
            gens.append(run_generation(config, workdir, index, ds, arrays, mesh, teacher,
                                       resume_hint=resume_hint))
    return gens
