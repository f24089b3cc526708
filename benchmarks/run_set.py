"""The fixed GPU benchmark set, one configuration at a time, then one table.

  python benchmarks/run_set.py --json gpu_set.json      # one GPU: the set below, < 8 minutes
  python benchmarks/run_set.py --shrink                 # tiny stand-ins on CPU (smoke run, tested)

Set: DenseNet-BC-100-12, DenseNet-BC-112-33 and WRN-28-10 at batch 128 on CIFAR-100 shapes
(32x32x3, 100 classes, synthetic data), each with the logit bank and the online teacher, in float32
and bfloat16: 12 configurations, each compiled once and timed over 5 x 10 dispatches.
Time budget: FLOPs per step from XLA's cost analysis (0.23 / 2.0 / 3.7 TFLOP with the bank, a
third more online) put every step under ~0.1 s on an H100/H200-class GPU, so timing is ~1 minute
in all and compilation dominates; a configuration is skipped (and marked so in the table) when
the time left under --budget-s is less than the slowest configuration so far took.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from banjax import bench  # noqa: E402

MODELS = ("densenet-bc-100-12", "densenet-bc-112-33", "wrn-28-10")
SHRUNK = {"densenet-bc-100-12": "densenet-bc-10-4", "densenet-bc-112-33": "densenet-bc-10-6",
          "wrn-28-10": "wrn-10-1"}
TEACHERS = ("bank", "online")
DTYPES = ("float32", "bfloat16")


def setups(shrink: bool, models: tuple[str, ...] = MODELS) -> list[bench.Setup]:
    """The 12 configurations (tiny models, 8x8 images, batch 8, 10 classes when shrunk)."""
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise ValueError(f"models {bad} are not in the set; valid: {', '.join(MODELS)}")
    out = []
    for model in models:
        for teacher in TEACHERS:
            for dtype in DTYPES:
                if shrink:
                    out.append(bench.Setup(model=SHRUNK[model], batch=8, teacher=teacher,
                                           dtype=dtype, image_size=8, num_classes=10))
                else:
                    out.append(bench.Setup(model=model, batch=128, teacher=teacher, dtype=dtype))
    return out


def run(shrink: bool, steps: int, repeats: int, budget_s: float,
        models: tuple[str, ...] = MODELS) -> list[dict]:
    """measure() every configuration in order, skipping when the budget would be exceeded."""
    rows, slowest, t0 = [], 0.0, time.perf_counter()
    for s in setups(shrink, models):
        left = budget_s - (time.perf_counter() - t0)
        if left < slowest:
            rows.append({"setup": dataclasses.asdict(s),
                         "skipped": f"{left:.0f} s left of the budget, slowest config took "
                                    f"{slowest:.0f} s"})
            continue
        t = time.perf_counter()
        rows.append(bench.measure(s, steps, repeats, fast_compile=shrink))
        slowest = max(slowest, time.perf_counter() - t)
        print(bench.format_measure(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shrink", action="store_true", default=bool(os.environ.get("BANJAX_SHRINK")),
                   help="tiny stand-in models on 8x8 images (CPU smoke run; env BANJAX_SHRINK=1)")
    p.add_argument("--steps", type=int, default=10, help="dispatches per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=450.0, help="stop starting configurations "
                   "that would end after this many seconds")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of the set")
    p.add_argument("--json", default="", help="write every result to this JSON file")
    args = p.parse_args(argv)
    steps, repeats = (2, 2) if args.shrink else (args.steps, args.repeats)
    t0 = time.perf_counter()
    models = tuple(m for m in args.models.split(",") if m)
    try:
        rows = run(args.shrink, steps, repeats, args.budget_s, models)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    dev = jax.devices()[0]
    print(f"\nbenchmark set{' (shrunk)' if args.shrink else ''}: {len(rows)} configurations on "
          f"{jax.device_count()} x {dev.device_kind}, jax {jax.__version__}, "
          f"{steps} dispatches x {repeats} repeats, total {wall:.0f} s")
    print(bench.table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"wall_s": wall, "shrink": args.shrink, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
