"""Train-step benchmarks on synthetic data: compile time, step time, FLOP/s, memory, bank size.

  python -m banjax.bench --model densenet-bc-40-12 --batch 64 --teacher bank
  python -m banjax.bench --model densenet-bc-40-12 --batch 64 --compare --comparisons teacher
  python -m banjax.bench --model densenet-bc-22-8 --batch 64 --image-size 8 --channels 1 \
      --num-classes 10 --compare --comparisons fusion

A configuration is compiled once (timed), warmed up, then timed `repeats` times over `steps`
dispatches; the per-step time is elapsed / (dispatches x steps per dispatch). `--compare` times two
configurations in one process with their repeats interleaved (A B, B A, ...), so slow drifts of a
shared machine hit both sides, and reports the median of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import platform
import re
import resource
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from banjax import bank, data, generations, models, train

TEACHERS = train.TEACHERS
DTYPES = generations.DTYPES
COMPARISONS = ("teacher", "fusion", "dtype", "remat")
EXTRA_COMPARISONS = ("bank_cost",)  # on request: bank vs no teacher (the bank's own cost)
FULL_BANK_NxKxC = (50000, 162, 100)  # CIFAR-100 train set, every view of pad-4 crop + flip
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
FAST_COMPILE = {"xla_backend_optimization_level": 0}
TARGETS = {"bank_over_online": 0.85, "fused_speedup": 2.0, "recompiles": 0}


@dataclasses.dataclass(frozen=True)
class Setup:
    """One benchmarked configuration (synthetic data of the given shapes)."""

    model: str = "densenet-bc-40-12"
    batch: int = 64
    teacher: str = "bank"  # none | bank | online
    teacher_model: str = ""  # online teacher's spec; "" = the student's
    dtype: str = "float32"
    steps_per_dispatch: int = 1
    remat: bool = False
    image_size: int = 32
    channels: int = 3
    num_classes: int = 100
    num_train: int = 0  # 0 = 16 x batch
    bank_views: int = 0  # 0 = the full view set
    seed: int = 0

    @property
    def train_size(self) -> int:
        """Number of synthetic training images."""
        return self.num_train or 16 * self.batch


def views_for(image_size: int) -> data.ViewSet:
    """CIFAR's pad-4 reflect crop + flip at 32; digits' pad-1 zero crop at 8; pad size/8 else."""
    big = image_size >= 16
    return data.ViewSet(pad=max(1, image_size // 8), size=image_size, flip=big,
                        mode="reflect" if big else "constant")


def validate(s: Setup, steps: int = 1, repeats: int = 1) -> None:
    """ValueError naming the first bad field of `s` (or steps/repeats) and what would be valid."""
    models.parse_spec(s.model)
    if s.teacher_model:
        models.parse_spec(s.teacher_model)
    if s.teacher not in TEACHERS:
        raise ValueError(f"teacher={s.teacher!r}; valid: {', '.join(TEACHERS)}")
    if s.dtype not in DTYPES:
        raise ValueError(f"dtype={s.dtype!r}; valid: {', '.join(DTYPES)}")
    for name in ("batch", "steps_per_dispatch", "image_size", "channels", "num_classes"):
        if getattr(s, name) < 1:
            raise ValueError(f"{name}={getattr(s, name)} must be >= 1")
    if s.image_size < 4:
        raise ValueError(f"image_size={s.image_size} must be >= 4 (the nets downsample twice)")
    if s.num_train and s.num_train < s.batch:
        raise ValueError(f"num_train={s.num_train} must be 0 (16 x batch) or >= batch={s.batch}")
    total = views_for(s.image_size).num_views
    if not 0 <= s.bank_views <= total:
        raise ValueError(f"bank_views={s.bank_views} must be 0 (all) or 1..{total}, the size of "
                         f"the view set at image_size={s.image_size}")
    if steps < 1 or repeats < 1:
        raise ValueError(f"steps={steps} and repeats={repeats} must both be >= 1")


def synthetic_arrays(s: Setup, mesh) -> dict:
    """Seeded random uint8 images and int labels in the engine's `arrays` layout, replicated."""
    rng = np.random.default_rng(s.seed)
    shape = (s.image_size, s.image_size, s.channels)
    host = {"train_images": rng.integers(0, 256, (s.train_size, *shape), dtype=np.uint8),
            "train_labels": rng.integers(0, s.num_classes, s.train_size).astype(np.int32),
            "test_images": rng.integers(0, 256, (s.batch, *shape), dtype=np.uint8),
            "test_labels": rng.integers(0, s.num_classes, s.batch).astype(np.int32)}
    mean, std = data.channel_stats(host["train_images"])
    host["mean"], host["std"] = mean, std
    return jax.device_put(host, data.replicated(mesh))


def create_model(s: Setup, spec: str, seed: int) -> nnx.Module:
    """models.create for the setup's shapes, dtype and remat."""
    return models.create(spec, s.num_classes, rngs=nnx.Rngs(seed), dtype=jnp.dtype(s.dtype),
                         remat=s.remat, in_channels=s.channels)


def bank_shape(s: Setup) -> tuple[int, int, int]:
    """N x K x C of the setup's logit bank."""
    return s.train_size, s.bank_views or views_for(s.image_size).num_views, s.num_classes


def make_teacher(s: Setup, mesh) -> tuple[Any, Any]:
    """(payload, teacher_graphdef): random float16 bank, a fresh online teacher, or nothing."""
    if s.teacher == "bank":
        n, k, c = bank_shape(s)
        key = jax.random.PRNGKey(s.seed + 1)
        table = bank.view_table(key, n, views_for(s.image_size), s.bank_views)
        logits = np.random.default_rng(s.seed + 1).normal(0, 3, (n, k, c)).astype(np.float16)
        return bank.to_device({"logits": logits, "view_ids": table}, mesh), None
    if s.teacher == "online":
        t_model = create_model(s, s.teacher_model or s.model, s.seed + 1)
        graphdef, params, rest = train.split(t_model)
        payload = jax.device_put({"params": params, "rest": rest}, data.replicated(mesh))
        return payload, train.to_eval(graphdef, params, rest)
    return None, None


def _cost(compiled) -> dict:
    """XLA's cost analysis as one dict (older JAX returns a one-element list)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def _memory(compiled) -> dict:
    """Per-program buffer sizes from compiled.memory_analysis() (as scheduled by the backend)."""
    m = compiled.memory_analysis()
    names = ("temp", "argument", "output", "alias", "generated_code")
    out = {f"{n}_bytes": int(getattr(m, f"{n}_size_in_bytes", 0) or 0) for n in names}
    out["peak_bytes"] = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
    return out


def peak_memory() -> tuple[int, str]:
    """(bytes, source): device peak_bytes_in_use on GPU/TPU, else this process's peak RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process peak RSS"


def entry_computation(hlo: str) -> str:
    """The ENTRY computation's text of an HLO module dump."""
    start = hlo.find("\nENTRY ")
    end = hlo.find("\n}", start)
    return hlo[start:end] if start >= 0 else ""


def scan_loop(hlo: str, steps: int) -> bool:
    """Whether `steps` fused steps are one top-level while loop with that trip count.

    XLA's HloCostAnalysis costs a while body once (it ignores the trip count), so a scanned program
    reports one step's flops; an unrolled one (no such loop) reports all `steps` steps.
    """
    if steps < 2:
        return False
    trip = f'"known_trip_count":{{"n":"{steps}"}}'
    loops = [ln for ln in entry_computation(hlo).splitlines() if " while(" in ln and trip in ln]
    return len(loops) == 1


@dataclasses.dataclass
class Prepared:
    """A compiled configuration with live (donated, threaded) state, ready to time."""

    setup: Setup
    call: Any  # the compiled executable (same dispatch path as the jitted function)
    state: Any
    arrays: dict
    teacher: Any
    lower_s: float
    compile_s: float
    cost: dict
    memory: dict
    num_params: int
    scan_loop: bool  # fused steps kept as one while loop (XLA then costs its body once)
    hlo: str
    fast: bool

    def run(self, dispatches: int) -> tuple[float, float]:
        """(wall, process CPU) seconds per train step over `dispatches` calls, to the last result.

        The process CPU time (all threads) is the cost of the work itself on a host shared with
        other jobs, which stretch the wall time but not it (on CPU backends).
        """
        out = None
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(dispatches):
            self.state, out = self.call(self.state, self.arrays, self.teacher)
        jax.block_until_ready((self.state, out))
        steps = dispatches * self.setup.steps_per_dispatch
        return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps

    def dispatch_overhead(self, dispatches: int = 50) -> float:
        """Seconds per call of a do-nothing program on the same (donated) arguments: host cost."""
        noop = jax.jit(lambda state, arrays, teacher: (state, state.step), donate_argnums=(0,))
        self.state, out = noop(self.state, self.arrays, self.teacher)
        jax.block_until_ready(out)
        t0 = time.perf_counter()
        for _ in range(dispatches):
            self.state, out = noop(self.state, self.arrays, self.teacher)
        jax.block_until_ready((self.state, out))
        return (time.perf_counter() - t0) / dispatches

    @property
    def flops_per_step(self) -> float:
        """XLA's FLOPs of one train step (a scanned loop's body is costed once, i.e. per step)."""
        reported = float(self.cost.get("flops", 0.0))
        return reported if self.scan_loop else reported / self.setup.steps_per_dispatch


def prepare(s: Setup, mesh=None, warmup: int = 2, fast_compile: bool = False) -> Prepared:
    """Fresh model, state, data and teacher; time trace+lower and XLA compile; warm up.

    fast_compile: LLVM backend at -O0 (XLA's HLO passes still run, so FLOPs and program memory are
    unchanged): for smoke runs only, the step times are then not representative.
    """
    validate(s)
    mesh = data.make_mesh() if mesh is None else mesh
    data.check_batch(s.batch, mesh)
    views = views_for(s.image_size)
    arrays = synthetic_arrays(s, mesh)
    model = create_model(s, s.model, s.seed)
    num_params = models.param_count(model)
    opt = train.OptConfig(total_steps=1_000_000)
    graphdef, state = train.init_state(model, opt, s.seed)
    state = jax.device_put(state, data.replicated(mesh))
    payload, t_graphdef = make_teacher(s, mesh)
    cfg = train.StepConfig(batch=s.batch, num_train=s.train_size, views=views, opt=opt,
                           teacher=s.teacher, dtype=s.dtype, steps=s.steps_per_dispatch)
    train.train_step_fn.cache_clear()  # fresh jit (and trace): no earlier identical program reused
    fn = train.train_step_fn(graphdef, cfg, mesh, t_graphdef)
    t0 = time.perf_counter()
    lowered = fn.lower(state, arrays, payload)
    t1 = time.perf_counter()
    compiled = lowered.compile(FAST_COMPILE if fast_compile else None)
    t2 = time.perf_counter()
    hlo = compiled.as_text()
    p = Prepared(s, compiled, state, arrays, payload, t1 - t0, t2 - t1, _cost(compiled),
                 _memory(compiled), num_params, scan_loop(hlo, s.steps_per_dispatch), hlo,
                 fast_compile)
    if warmup:
        p.run(warmup)
    return p


def compile_only(s: Setup) -> dict:
    """Compile time, FLOPs per step and program memory of a configuration, without running it."""
    p = prepare(s, warmup=0)
    return {"setup": dataclasses.asdict(s), "num_params": p.num_params, "lower_s": p.lower_s,
            "xla_compile_s": p.compile_s, "compile_s": p.lower_s + p.compile_s,
            "flops_per_step": p.flops_per_step, "program_memory": p.memory,
            "platform": jax.default_backend(), "loadavg_1m": os.getloadavg()[0]}


def _stats(per_step_s: list[float]) -> dict:
    a = np.asarray(per_step_s)
    q25, med, q75 = np.percentile(a, [25, 50, 75])
    return {"step_s_median": float(med), "step_s_q25": float(q25), "step_s_q75": float(q75),
            "step_s_min": float(a.min()), "step_s_max": float(a.max()),
            "step_s_iqr_rel": float((q75 - q25) / med), "step_s_all": [float(x) for x in a]}


def summarize(p: Prepared, per_step_s: list[float], steps: int, cpu_s: list[float]) -> dict:
    """The result dict of one configuration from its wall and process-CPU timings per step."""
    s = p.setup
    n, k, c = bank_shape(s)
    stats = _stats(per_step_s)
    stats["cpu_s_median"] = float(np.median(cpu_s))
    stats["cpu_s_all"] = [float(x) for x in cpu_s]
    flops_step = p.flops_per_step
    peak, source = peak_memory()
    dev = jax.devices()[0]
    return {
        "setup": dataclasses.asdict(s), "steps": steps, "repeats": len(per_step_s),
        "platform": dev.platform, "device": dev.device_kind, "num_devices": jax.device_count(),
        "cpu_count": _cpu_count(), "jax": jax.__version__, "python": platform.python_version(),
        "num_params": p.num_params, "loadavg_1m": os.getloadavg()[0], "fast_compile": p.fast,
        "lower_s": p.lower_s, "xla_compile_s": p.compile_s, "compile_s": p.lower_s + p.compile_s,
        **stats,
        "images_per_s": s.batch / stats["step_s_median"],
        "flops_per_step": flops_step,
        "flops_per_dispatch": flops_step * s.steps_per_dispatch,
        "flops_reported": float(p.cost.get("flops", 0.0)), "scan_loop": p.scan_loop,
        "flop_per_s": flops_step / stats["step_s_median"],
        "peak_memory_bytes": peak, "peak_memory_source": source,
        "program_memory": p.memory,
        "bank_shape": [n, k, c] if s.teacher == "bank" else None,
        "bank_bytes": n * k * c * 2 if s.teacher == "bank" else 0,
        "bank_view_ids_bytes": n * k * 2 if s.teacher == "bank" else 0,
        "bank_full_cifar100_bytes": int(np.prod(FULL_BANK_NxKxC)) * 2,
    }


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def measure(s: Setup, steps: int = 20, repeats: int = 5, profile_dir: str = "",
            fast_compile: bool = False) -> dict:
    """Compile, warm up, then time `repeats` x `steps` dispatches of one configuration."""
    validate(s, steps, repeats)
    p = prepare(s, fast_compile=fast_compile)
    wall, cpu = zip(*[p.run(steps) for _ in range(repeats)])
    result = summarize(p, list(wall), steps, list(cpu))
    result["dispatch_s"] = p.dispatch_overhead()
    if profile_dir:
        result["profile"] = profile(p, steps, profile_dir)
    return result


def timed_pair(pa: Prepared, pb: Prepared, steps_a: int, steps_b: int, repeats: int) -> dict:
    """Both configurations timed in one process, repeats interleaved; ratio = a / b per step."""
    ta, tb = [], []
    for r in range(repeats):
        for p, t, n in ((pa, ta, steps_a), (pb, tb, steps_b))[:: 1 if r % 2 == 0 else -1]:
            t.append(p.run(n))
    (wa, ca), (wb, cb) = (np.asarray(t).T for t in (ta, tb))
    ratios = wa / wb
    return {"a": summarize(pa, list(wa), steps_a, list(ca)),
            "b": summarize(pb, list(wb), steps_b, list(cb)),
            "ratio_median": float(np.median(ratios)), "ratio_min": float(ratios.min()),
            "ratio_max": float(ratios.max()), "cpu_ratio_median": float(np.median(ca / cb))}


CONTROL_FLOW = ("while", "call", "conditional")  # their events contain their bodies' ops


def op_stem(name: str) -> str:
    """HLO instruction name without its numeric suffix: 'ynn_fusion.12' -> 'ynn_fusion'."""
    return re.sub(r"(\.\d+)+$", "", name)


def profile(p: Prepared, dispatches: int, logdir: str, top: int = 15) -> dict:
    """Time per train step of each kind of XLA op, from a jax.profiler trace of `dispatches` calls.

    On CPU the op events need XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true set before JAX starts
    (the command line does this for --profile). Ops are grouped by instruction name stem; control
    flow (while/call/conditional) is left out since its events include its body's ops.
    """
    names = set(re.findall(r"^\s*(?:ROOT )?%?([\w.-]+) = ", p.hlo, re.M))
    t0 = time.perf_counter()
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
        p.run(dispatches)
    wall = time.perf_counter() - t0
    files = glob.glob(os.path.join(logdir, "**", "*.json.gz"), recursive=True)
    with gzip.open(max(files, key=os.path.getmtime)) as f:
        events = json.load(f)
    events = events.get("traceEvents", []) if isinstance(events, dict) else events
    steps = dispatches * p.setup.steps_per_dispatch
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in names:
            stem = op_stem(e["name"])
            if stem not in CONTROL_FLOW:
                total[stem] += e["dur"] * 1e-6  # microseconds -> seconds
                count[stem] += 1
    ops_s = sum(total.values())
    rows = [{"op": k, "ms_per_step": v / steps * 1e3, "calls_per_step": count[k] / steps,
             "share": v / ops_s} for k, v in total.most_common(top)]
    return {"steps": steps, "traced_wall_ms_per_step": wall / steps * 1e3,
            "ops_ms_per_step": ops_s / steps * 1e3, "ops": rows, "trace_dir": logdir}


def format_profile(r: dict) -> str:
    """Lines of a profile() result."""
    lines = [f"profile over {r['steps']} steps: ops {r['ops_ms_per_step']:.2f} ms/step "
             f"(wall under tracing {r['traced_wall_ms_per_step']:.2f} ms/step); trace in "
             f"{r['trace_dir']}", f"  {'op':<36}{'ms/step':>9}{'calls/step':>12}{'share':>8}"]
    for o in r["ops"]:
        lines.append(f"  {o['op']:<36}{o['ms_per_step']:>9.2f}{o['calls_per_step']:>12.0f}"
                     f"{100 * o['share']:>7.1f}%")
    return "\n".join(lines)


class CompileCounter:
    """Counts XLA backend compilations while active (a context manager)."""

    def __init__(self):
        self.count = 0
        self._on = False
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kwargs):
        if self._on and event == BACKEND_COMPILE:
            self.count += 1

    def __enter__(self):
        self.count, self._on = 0, True
        return self

    def __exit__(self, *exc):
        self._on = False


_COUNTER: CompileCounter | None = None


def recompiles(s: Setup, generations: int = 2) -> dict:
    """Fresh models of one spec through train.fit + evaluate: compiles and traces per generation."""
    global _COUNTER
    _COUNTER = _COUNTER or CompileCounter()
    validate(s)
    mesh = data.make_mesh()
    arrays = synthetic_arrays(s, mesh)
    payload, t_graphdef = make_teacher(s, mesh)
    n = s.steps_per_dispatch
    n_steps = n + 1 if n > 1 else 2  # a fused dispatch and a single-step remainder, as fit does
    opt = train.OptConfig(total_steps=n_steps)
    cfg = train.StepConfig(batch=s.batch, num_train=s.train_size, views=views_for(s.image_size),
                           opt=opt, teacher=s.teacher, dtype=s.dtype, steps=s.steps_per_dispatch)
    out = {"compiles": [], "traces": []}
    train.train_step_fn.cache_clear()  # the first generation compiles even after prepare()
    for g in range(generations):
        graphdef, state = train.init_state(create_model(s, s.model, s.seed + 10 + g), opt, g)
        traces = sum(train.TRACES.values())
        with _COUNTER:
            state = train.fit(graphdef, state, cfg, arrays, mesh, total_steps=n_steps,
                              teacher=payload, teacher_graphdef=t_graphdef, log_every=n_steps)
            train.evaluate(graphdef, state.params, state.rest, arrays, s.batch, s.batch, mesh,
                           dtype=s.dtype)
        out["compiles"].append(_COUNTER.count)
        out["traces"].append(sum(train.TRACES.values()) - traces)
    out["recompiles"] = sum(out["compiles"][1:])
    return out


def compare(s: Setup, steps: int = 20, repeats: int = 5, fuse: int = 8,
            which: tuple[str, ...] = COMPARISONS, check_recompiles: bool = True,
            fast_compile: bool = False) -> dict:
    """The A/B comparisons around `s` (one factor changed each) and the recompilation check."""
    validate(s, steps, repeats)
    bad = [w for w in which if w not in COMPARISONS + EXTRA_COMPARISONS]
    if bad or fuse < 2:
        raise ValueError(f"comparisons {bad} / fuse={fuse}: valid comparisons "
                         f"{COMPARISONS + EXTRA_COMPARISONS}, fuse >= 2")
    rep = dataclasses.replace
    prepared: dict[Setup, Prepared] = {}  # the base configuration is compiled once, shared

    def pair(a: Setup, b: Setup, steps_a: int = steps, steps_b: int = steps) -> dict:
        for x in (a, b):
            if x not in prepared:
                prepared[x] = prepare(x, fast_compile=fast_compile)
        return timed_pair(prepared[a], prepared[b], steps_a, steps_b, repeats)

    out: dict = {"setup": dataclasses.asdict(s), "steps": steps, "repeats": repeats}
    if "teacher" in which:
        r = pair(rep(s, teacher="bank"), rep(s, teacher="online"))
        out["teacher"] = {**r, "bank_over_online": r["ratio_median"]}
    if "bank_cost" in which:
        r = pair(rep(s, teacher="bank"), rep(s, teacher="none"))
        out["bank_cost"] = {**r, "bank_over_none": r["ratio_median"]}
    if "fusion" in which:  # equal work on both sides: steps x fuse train steps per repeat
        r = pair(rep(s, steps_per_dispatch=fuse), rep(s, steps_per_dispatch=1), steps, steps * fuse)
        d = prepared[rep(s, steps_per_dispatch=1)].dispatch_overhead()
        t1 = r["b"]["step_s_median"]
        out["fusion"] = {**r, "fuse": fuse, "fused_speedup": 1.0 / r["ratio_median"],
                         "fused_speedup_range": [1.0 / r["ratio_max"], 1.0 / r["ratio_min"]],
                         "dispatch_s": d, "speedup_bound": t1 / max(t1 - d + d / fuse, 1e-12)}
    if "dtype" in which:
        r = pair(rep(s, dtype="bfloat16"), rep(s, dtype="float32"))
        out["dtype"] = {**r, "bf16_over_f32": r["ratio_median"]}
    if "remat" in which:
        r = pair(rep(s, remat=True), rep(s, remat=False))
        temp_on = r["a"]["program_memory"]["temp_bytes"]
        temp_off = r["b"]["program_memory"]["temp_bytes"]
        out["remat"] = {**r, "remat_time_ratio": r["ratio_median"],
                        "remat_temp_ratio": temp_on / max(temp_off, 1)}
    if check_recompiles:
        out["recompile_check"] = recompiles(s)
    out["targets"] = targets(out)
    return out


def targets(result: dict) -> dict:
    """Which of the project's targets the comparisons present in `result` meet."""
    out = {}
    if "teacher" in result:
        v = result["teacher"]["bank_over_online"]
        out["bank_over_online<=0.85"] = {"value": v, "met": v <= TARGETS["bank_over_online"],
                                         "cpu_value": result["teacher"]["cpu_ratio_median"]}
    if "fusion" in result:
        v = result["fusion"]["fused_speedup"]
        out["fused_speedup>=2"] = {"value": v, "met": v >= TARGETS["fused_speedup"],
                                   "cpu_value": 1 / result["fusion"]["cpu_ratio_median"]}
    if "recompile_check" in result:
        v = result["recompile_check"]["recompiles"]
        out["recompiles==0"] = {"value": v, "met": v == TARGETS["recompiles"]}
    return out


# ---------------------------------------------------------------- printing


def _mb(x: float) -> str:
    return f"{x / 2**20:.1f} MiB"


def format_measure(r: dict) -> str:
    """Human-readable lines for one configuration."""
    s = r["setup"]
    m = r["program_memory"]
    lines = [
        f"{s['model']} batch {s['batch']} teacher {s['teacher']} {s['dtype']} "
        f"steps/dispatch {s['steps_per_dispatch']} "
        f"remat {s['remat']} "
        f"({s['image_size']}x{s['image_size']}x{s['channels']}, {s['num_classes']} classes) "
        f"on {r['num_devices']} x {r['device']} ({r['platform']}, {r['cpu_count']} CPUs), "
        f"jax {r['jax']}",
        f"  params {r['num_params']:,}  compile {r['compile_s']:.2f} s "
        f"(trace+lower {r['lower_s']:.2f} s, XLA {r['xla_compile_s']:.2f} s)",
        f"  step {r['step_s_median'] * 1e3:.2f} ms median (IQR {r['step_s_q25'] * 1e3:.2f}-"
        f"{r['step_s_q75'] * 1e3:.2f}, min-max {r['step_s_min'] * 1e3:.2f}-"
        f"{r['step_s_max'] * 1e3:.2f}) over {r['repeats']} x {r['steps']} dispatches; process "
        f"CPU {r['cpu_s_median'] * 1e3:.2f} ms/step (load average {r['loadavg_1m']:.2f})",
        f"  {r['images_per_s']:.1f} images/s  {r['flops_per_step'] / 1e9:.3f} GFLOP/step  "
        f"{r['flop_per_s'] / 1e9:.2f} GFLOP/s  dispatch overhead "
        f"{r.get('dispatch_s', float('nan')) * 1e3:.2f} ms/call",
        f"  peak memory {_mb(r['peak_memory_bytes'])} ({r['peak_memory_source']}); program: temp "
        f"{_mb(m['temp_bytes'])}, arguments {_mb(m['argument_bytes'])}, outputs "
        f"{_mb(m['output_bytes'])}",
        f"  bank {r['bank_shape']} float16 = {_mb(r['bank_bytes'])} (+ view ids "
        f"{_mb(r['bank_view_ids_bytes'])}); full CIFAR-100 bank {FULL_BANK_NxKxC} float16 = "
        f"{r['bank_full_cifar100_bytes'] / 1e9:.2f} GB",
    ]
    return "\n".join(lines)


def format_compare(r: dict) -> str:
    """Human-readable ratio lines of a compare() result."""
    lines = []
    named = (("teacher", "bank_over_online", "bank / online step time"),
             ("bank_cost", "bank_over_none", "bank / no-teacher step time"),
             ("fusion", "fused_speedup", "speedup per image, fused vs 1 step/dispatch"),
             ("dtype", "bf16_over_f32", "bfloat16 / float32 step time"),
             ("remat", "remat_time_ratio", "remat on / off step time"))
    for part, key, what in named:
        if part in r:
            p = r[part]
            lo, hi = p.get(f"{key}_range", (p["ratio_min"], p["ratio_max"]))
            cpu = 1 / p["cpu_ratio_median"] if part == "fusion" else p["cpu_ratio_median"]
            lines.append(f"{what}: {p[key]:.3f} (per-repeat {lo:.3f}-{hi:.3f}; process CPU time "
                         f"{cpu:.3f}) [{p['a']['step_s_median'] * 1e3:.2f} vs "
                         f"{p['b']['step_s_median'] * 1e3:.2f} ms/step]")
    if "fusion" in r:
        f = r["fusion"]
        lines.append(f"dispatch overhead {f['dispatch_s'] * 1e3:.2f} ms/call: fusing {f['fuse']} "
                     f"steps can at most give {f['speedup_bound']:.3f}x if compute stays the same")
    if "remat" in r:
        m_on, m_off = (r["remat"][k]["program_memory"]["temp_bytes"] for k in ("a", "b"))
        lines.append(f"remat on / off program temp memory: {r['remat']['remat_temp_ratio']:.3f} "
                     f"[{_mb(m_on)} vs {_mb(m_off)}]")
    if "recompile_check" in r:
        c = r["recompile_check"]
        lines.append(f"compilations per generation (fit + evaluate): {c['compiles']}, traces "
                     f"{c['traces']}; after the first: {c['recompiles']}")
    for name, t in r.get("targets", {}).items():
        lines.append(f"target {name}: {t['value']:.3f} -> {'met' if t['met'] else 'MISSED'}")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    """A fixed-width table of measure() results (one line each)."""
    head = (f"{'model':<20}{'teacher':<8}{'dtype':<9}{'batch':>6}{'compile s':>10}{'step ms':>9}"
            f"{'IQR %':>7}{'img/s':>9}{'TFLOP/s':>9}{'temp MiB':>10}{'peak MiB':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        s = r["setup"]
        if "skipped" in r:
            lines.append(f"{s['model']:<20}{s['teacher']:<8}{s['dtype']:<9}{s['batch']:>6}  "
                         f"skipped: {r['skipped']}")
            continue
        lines.append(
            f"{s['model']:<20}{s['teacher']:<8}{s['dtype']:<9}{s['batch']:>6}"
            f"{r['compile_s']:>10.1f}{r['step_s_median'] * 1e3:>9.2f}"
            f"{100 * r['step_s_iqr_rel']:>7.1f}{r['images_per_s']:>9.0f}"
            f"{r['flop_per_s'] / 1e12:>9.3f}{r['program_memory']['temp_bytes'] / 2**20:>10.1f}"
            f"{r['peak_memory_bytes'] / 2**20:>10.0f}")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    d = Setup()
    p = argparse.ArgumentParser(prog="python -m banjax.bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=d.model, help="architecture spec, e.g. densenet-bc-40-12")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--teacher", default=d.teacher, choices=TEACHERS)
    p.add_argument("--teacher-model", default="", help="online teacher spec (default: --model)")
    p.add_argument("--dtype", default=d.dtype, choices=DTYPES)
    p.add_argument("--steps-per-dispatch", type=int, default=d.steps_per_dispatch)
    p.add_argument("--remat", action="store_true")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--channels", type=int, default=d.channels)
    p.add_argument("--num-classes", type=int, default=d.num_classes)
    p.add_argument("--num-train", type=int, default=0,
                   help="synthetic train images (0: 16 x batch)")
    p.add_argument("--bank-views", type=int, default=0, help="K views per image (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20, help="dispatches per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compare", action="store_true", help="run the A/B comparisons, print ratios")
    p.add_argument("--comparisons", default=",".join(COMPARISONS),
                   help=f"comma-separated subset of {','.join(COMPARISONS + EXTRA_COMPARISONS)}")
    p.add_argument("--fuse", type=int, default=8, help="steps per dispatch of the fused side")
    p.add_argument("--no-recompile-check", action="store_true")
    p.add_argument("--fast-compile", action="store_true",
                   help="LLVM -O0 (smoke runs: fast compiles, unrepresentative step times)")
    p.add_argument("--profile", default="", help="also trace the measured configuration with "
                   "jax.profiler into this directory and print the time per XLA op kind")
    p.add_argument("--compile-only", action="store_true", help="compile without running: "
                   "compile time, FLOPs per step, program memory (for planning runs elsewhere)")
    p.add_argument("--json", default="", help="also write the result as JSON to this path")
    return p


def setup_from_args(args) -> Setup:
    """A Setup from parsed command-line arguments."""
    return Setup(model=args.model, batch=args.batch, teacher=args.teacher,
                 teacher_model=args.teacher_model, dtype=args.dtype,
                 steps_per_dispatch=args.steps_per_dispatch, remat=args.remat,
                 image_size=args.image_size, channels=args.channels, num_classes=args.num_classes,
                 num_train=args.num_train, bank_views=args.bank_views, seed=args.seed)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.profile:  # op-level events on CPU; must be set before the backend starts
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_enable_xprof_traceme=true").strip()
    try:
        s = setup_from_args(args)
        validate(s, args.steps, args.repeats)
        if args.compile_only:
            result = compile_only(s)
            text = (f"{s.model} batch {s.batch} teacher {s.teacher} {s.dtype}: "
                    f"{result['num_params']:,} params, compile {result['compile_s']:.1f} s, "
                    f"{result['flops_per_step'] / 1e9:.1f} GFLOP/step, program temp "
                    f"{_mb(result['program_memory']['temp_bytes'])}")
        elif args.compare:
            which = tuple(w for w in args.comparisons.split(",") if w)
            result = compare(s, args.steps, args.repeats, args.fuse, which,
                             check_recompiles=not args.no_recompile_check,
                             fast_compile=args.fast_compile)
            text = format_compare(result)
        else:
            result = measure(s, args.steps, args.repeats, profile_dir=args.profile,
                             fast_compile=args.fast_compile)
            text = format_measure(result)
            if args.profile:
                text += "\n" + format_profile(result["profile"])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
