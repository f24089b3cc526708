"""Training engine: optimiser, sharded jit train/eval steps, Orbax checkpoints, signals, logging.

The model is split once into an NNX graphdef (static) and state (params + the rest: BatchNorm statistics
and frozen transplanted layers). Everything a step needs (batch order, augmentation views, dropout, DKPP
permutation) is derived on device from the state's key and step counter, so a run restored from a
checkpoint continues bitwise as if it had never stopped.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx, struct

from banjax import data, losses

# Python-side trace counter per step kind: a retrace means a recompilation (used by tests and bench).
TRACES: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class OptConfig:
    """Hashable optimiser settings (the WRN recipe by default)."""

    total_steps: int
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "piecewise"  # or "cosine"
    boundaries: tuple[float, ...] = (0.3, 0.6, 0.8)
    decay: float = 0.2


SCHEDULES = ("piecewise", "cosine")


def opt_config(config, total_steps: int) -> OptConfig:
    """OptConfig from a config's `optimizer` block."""
    o = config.optimizer
    return OptConfig(total_steps=total_steps, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                     weight_decay=o.weight_decay, schedule=o.schedule,
                     boundaries=tuple(o.boundaries), decay=o.decay)


def learning_rate(cfg: OptConfig):
    """Learning-rate schedule: piecewise constant (x decay at fractions of training) or cosine."""
    if cfg.schedule == "piecewise":
        steps = {int(round(f * cfg.total_steps)): cfg.decay for f in cfg.boundaries}
        return optax.piecewise_constant_schedule(cfg.lr, steps)
    if cfg.schedule == "cosine":
        return optax.cosine_decay_schedule(cfg.lr, max(cfg.total_steps, 1))
    raise ValueError(f"optimizer.schedule={cfg.schedule!r}; valid: {SCHEDULES}")


def _decay_mask(params):
    """Weight decay on convolution and dense kernels only (ndim >= 2): not on BN scales or biases."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


@functools.cache
def make_optimizer(cfg: OptConfig) -> optax.GradientTransformation:
    """SGD (Nesterov) with L2 weight decay coupled as in PyTorch/WRN; cached so jit caches hit."""
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay, mask=_decay_mask),
        optax.sgd(learning_rate(cfg), momentum=cfg.momentum, nesterov=cfg.nesterov),
    )


@struct.dataclass
class TrainState:
    """Everything that changes during training; the teacher is never in here."""

    step: jax.Array
    params: Any
    rest: Any
    opt_state: Any
    key: jax.Array  # raw uint32 key: data order, views, dropout and DKPP derive from it


def split(model: nnx.Module):
    """(graphdef, params, rest): trainable nnx.Param and everything else (BatchStat, Frozen)."""
    return nnx.split(model, nnx.Param, ...)


def init_state(model: nnx.Module, opt: OptConfig, seed: int) -> tuple[Any, TrainState]:
    """Train-mode graphdef and a fresh TrainState for `model`."""
    model.train()
    graphdef, params, rest = split(model)
    opt_state = make_optimizer(opt).init(params)
    key = jax.random.PRNGKey(seed)
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, rest, opt_state, key)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static, hashable description of a train step: changing any field recompiles."""

    batch: int
    num_train: int
    views: data.ViewSet
    opt: OptConfig
    teacher: str = "none"  # "none" | "bank" | "online"
    mode: str = "ban+l"
    temperature: float = 1.0
    label_weight: float = 1.0
    kl_weight: float = 1.0
    dtype: str = "float32"
    steps: int = 1  # steps fused into one dispatch with lax.scan


TEACHERS = ("none", "bank", "online")


def _keys(key, step):
    """Per-step keys for data order (epoch-level), views, dropout and DKPP."""
    k_data = jax.random.fold_in(key, 0)
    k_view, k_drop, k_dkpp = (jax.random.fold_in(jax.random.fold_in(key, i), step) for i in (1, 2, 3))
    return k_data, k_view, k_drop, k_dkpp


def _one_step(graphdef, cfg: StepConfig, mesh, teacher_graphdef, state: TrainState, arrays, teacher):
    """One SGD step on a batch gathered, augmented and normalised on device."""
    dtype = jnp.dtype(cfg.dtype)
    bsh = data.batch_sharding(mesh)
    k_data, k_view, k_drop, k_dkpp = _keys(state.key, state.step)
    idx_B = jax.lax.with_sharding_constraint(
        data.train_indices(k_data, state.step, cfg.batch, cfg.num_train), bsh)
    teacher_logits = None
    if cfg.teacher == "bank":
        slot_B = jax.random.randint(k_view, (cfg.batch,), 0, teacher["logits"].shape[1])
        view_B = teacher["view_ids"][idx_B, slot_B].astype(jnp.int32)
        teacher_logits = teacher["logits"][idx_B, slot_B].astype(jnp.float32)
    else:
        view_B = data.sample_views(k_view, cfg.batch, cfg.views)
    x = data.augment(arrays["train_images"][idx_B], view_B, cfg.views)
    x = jax.lax.with_sharding_constraint(
        data.normalize(x, arrays["mean"], arrays["std"], dtype), bsh)
    y_B = arrays["train_labels"][idx_B]
    if cfg.teacher == "online":
        t_model = nnx.merge(teacher_graphdef, teacher["params"], teacher["rest"])
        teacher_logits = jax.lax.stop_gradient(t_model(x).astype(jnp.float32))

    model = nnx.merge(graphdef, state.params, state.rest)

    def loss_fn(model):
        logits_BxC = model(x, rngs=nnx.Rngs(dropout=k_drop)).astype(jnp.float32)
        loss, metrics = losses.ban_loss(
            logits_BxC, y_B, teacher_logits, mode=cfg.mode, temperature=cfg.temperature,
            label_weight=cfg.label_weight, kl_weight=cfg.kl_weight, key=k_dkpp)
        metrics["error"] = jnp.mean(jnp.argmax(logits_BxC, -1) != y_B)
        return loss, metrics

    # nnx.grad updates the BatchNorm statistics on `model`; gradients only for nnx.Param.
    grad_fn = nnx.grad(loss_fn, has_aux=True, argnums=nnx.DiffState(0, nnx.Param))
    grads, metrics = grad_fn(model)
    rest = nnx.split(model, nnx.Param, ...)[2]
    tx = make_optimizer(cfg.opt)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["lr"] = learning_rate(cfg.opt)(state.step)
    new = state.replace(step=state.step + 1, params=params, rest=rest, opt_state=opt_state)
    return new, metrics


@functools.cache
def train_step_fn(graphdef, cfg: StepConfig, mesh, teacher_graphdef=None):
    """Jitted (state, arrays, teacher) -> (state, metrics) running `cfg.steps` fused steps.

    Cached on (architecture, static config, mesh): generations that repeat an architecture reuse the
    compiled program. The state buffers are donated.
    """
    if cfg.teacher not in TEACHERS:
        raise ValueError(f"teacher signal {cfg.teacher!r}; valid: {TEACHERS}")

    def run(state, arrays, teacher):
        TRACES[("train", cfg.teacher, cfg.steps)] += 1
        body = functools.partial(_one_step, graphdef, cfg, mesh, teacher_graphdef)
        if cfg.steps == 1:
            return body(state, arrays, teacher)
        state, metrics = jax.lax.scan(lambda s, _: body(s, arrays, teacher), state, None,
                                      length=cfg.steps, unroll=_unroll(mesh, cfg.steps))
        return state, jax.tree.map(jnp.mean, metrics)

    return jax.jit(run, donate_argnums=(0,))


def _unroll(mesh, steps: int) -> int:
    """Fused steps fully unrolled on CPU: XLA:CPU puts convolutions in its fast-kernel layout only
    outside loops, so a scanned step runs ~4.5x slower there (docs/performance.md)."""
    return steps if mesh.devices.flat[0].platform == "cpu" else 1


def forward(graphdef, params, rest, images_uint8, arrays, dtype: str = "float32"):
    """Float32 logits of the model on uint8 images, normalised on device in the compute dtype."""
    x = data.normalize(images_uint8, arrays["mean"], arrays["std"], jnp.dtype(dtype))
    return nnx.merge(graphdef, params, rest)(x).astype(jnp.float32)


@functools.cache
def eval_step_fn(graphdef, mesh, dtype: str = "float32", with_probs: bool = False):
    """Jitted sums of errors and NLL over a masked batch (inference-mode graphdef), optional probs."""
    bsh = data.batch_sharding(mesh)

    def run(params, rest, arrays, idx_B, mask_B):
        TRACES[("eval", with_probs)] += 1
        idx_B = jax.lax.with_sharding_constraint(idx_B, bsh)
        y_B = arrays["test_labels"][idx_B]
        logits_BxC = forward(graphdef, params, rest, arrays["test_images"][idx_B], arrays, dtype)
        logp_BxC = jax.nn.log_softmax(logits_BxC)
        nll_B = -jnp.take_along_axis(logp_BxC, y_B[:, None], axis=1)[:, 0]
        err_B = (jnp.argmax(logits_BxC, -1) != y_B).astype(jnp.float32)
        out = {"errors": jnp.sum(err_B * mask_B), "nll": jnp.sum(nll_B * mask_B)}
        if with_probs:
            out["probs"] = jnp.exp(logp_BxC)
        return out

    return jax.jit(run)


def to_eval(graphdef, params, rest):
    """Inference-mode graphdef for a train-mode one."""
    model = nnx.merge(graphdef, params, rest)
    model.eval()
    return nnx.split(model, nnx.Param, ...)[0]


def evaluate(graphdef, params, rest, arrays, num_test: int, batch: int, mesh, *,
             dtype: str = "float32", with_probs: bool = False) -> dict:
    """Test error and NLL over every test example (padded, masked last batch); probs if asked."""
    fn = eval_step_fn(to_eval(graphdef, params, rest), mesh, dtype, with_probs)
    batches = data.eval_batches(num_test, batch)
    outs = [fn(params, rest, arrays, jnp.asarray(idx), jnp.asarray(mask, jnp.float32))
            for idx, mask in batches]  # dispatched back to back; fetched once below
    outs = jax.device_get(outs)
    result = {"error": sum(float(o["errors"]) for o in outs) / num_test,
              "nll": sum(float(o["nll"]) for o in outs) / num_test}
    if with_probs:
        result["probs"] = np.concatenate([o["probs"][m] for o, (_, m) in zip(outs, batches)])
    return result


# ---------------------------------------------------------------- checkpoints


def checkpoint_manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """Orbax manager for one generation's checkpoints (synchronous: a save is complete on return)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, state: TrainState) -> int:
    """Save `state` at its step (no-op if that step is already saved)."""
    step = int(state.step)
    if step not in mngr.all_steps():
        mngr.save(step, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()
    return step


def restore(mngr: ocp.CheckpointManager, like: TrainState, mesh, step: int | None = None):
    """Restore the latest (or given) checkpoint into the structure of `like`, replicated on `mesh`."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        return None
    sharding = data.replicated(mesh)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), like)
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


# ---------------------------------------------------------------- the loop


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss."""


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was saved."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class _SignalFlag:
    """Turns SIGTERM/SIGINT into a flag polled at safe points; reentrant (chain, then fit)."""

    def __init__(self):
        self.signum = None
        self._depth = 0
        self._old = {}

    def __enter__(self):
        if self._depth == 0:
            self.signum = None
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread: signals stay as they are
                    pass
        self._depth += 1
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            for sig, old in self._old.items():
                signal.signal(sig, old)
            self._old = {}


STOP = _SignalFlag()  # `with STOP as flag:` defers SIGTERM/SIGINT to the next safe point


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _check_finite(metrics: dict, name: str, step: int):
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"{name}: non-finite loss {loss} at step {step}; the last good checkpoint "
                            "is kept; lower the learning rate or check the inputs")


def fit(graphdef, state: TrainState, cfg: StepConfig, arrays, mesh, *, total_steps: int,
        mngr: ocp.CheckpointManager | None = None, checkpoint_every: int = 0, teacher=None,
        teacher_graphdef=None, name: str = "train", writer=None, progress=None,
        log_every: int = 50, resume_hint: str = "") -> TrainState:
    """Run steps until `total_steps`, checkpointing, logging one dispatch late, polling signals."""
    fused = train_step_fn(graphdef, cfg, mesh, teacher_graphdef)
    single = train_step_fn(graphdef, dataclasses.replace(cfg, steps=1), mesh, teacher_graphdef)
    rep = data.replicated(mesh)
    state, teacher = jax.device_put((state, teacher), rep)  # fixed shardings: one compilation
    step = int(state.step)
    pending, last_log, t0 = None, step, time.perf_counter()

    def flush(pending):
        nonlocal last_log, t0
        metrics, at = pending
        metrics = jax.device_get(metrics)
        _check_finite(metrics, name, at)
        if at - last_log >= log_every or at == total_steps:
            elapsed = time.perf_counter() - t0
            host = {k: float(v) for k, v in metrics.items()}
            host["images_per_s"] = (at - last_log) * cfg.batch / max(elapsed, 1e-9)
            if writer is not None:
                writer.write(at, host, prefix="train/")
            last_log, t0 = at, time.perf_counter()
        if progress is not None:
            progress.update(at, {k: float(v) for k, v in metrics.items()}, cfg.batch)

    with STOP as flag:
        while step < total_steps:
            fn = fused if total_steps - step >= cfg.steps else single
            state, metrics = fn(state, arrays, teacher)
            step += cfg.steps if fn is fused else 1
            if pending is not None:
                flush(pending)  # the previous dispatch's metrics: the device is busy with this one
            pending = (metrics, step)
            due = mngr is not None and checkpoint_every and (
                step // checkpoint_every > (step - (cfg.steps if fn is fused else 1)) // checkpoint_every)
            if due or flag.signum is not None:
                flush(pending)
                pending = None
                if mngr is not None:
                    _save_if_finite(mngr, state, name)
            if flag.signum is not None:
                where = f"checkpoint at step {step}" if mngr is not None else "no checkpoint"
                raise Interrupted(flag.signum, f"{name}: stopped by signal {flag.signum} at step {step} "
                                  f"({where}). Resume with: {resume_hint}")
        if pending is not None:
            flush(pending)
        if mngr is not None:
            _save_if_finite(mngr, state, name)
    return state


def _save_if_finite(mngr, state: TrainState, name: str) -> None:
    """Save unless the parameters went non-finite (the loss is checked one step behind them)."""
    if not bool(_all_finite(state.params)):
        raise NonFiniteLoss(f"{name}: non-finite parameters at step {int(state.step)}; the last "
                            "good checkpoint is kept; lower the learning rate or check the inputs")
    save(mngr, state)
