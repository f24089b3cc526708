"""Parameter count and forward FLOPs of a model spec, without initialising it.

  python -m banjax.summary densenet-bc-80-120 [--num-classes 100] [--image-size 32]
  python -m banjax.summary --list

FLOPs are XLA's cost analysis of one eval-mode forward pass (batch 1) on abstract inputs: a
multiply-add counts 2, taps that fall on zero padding are not counted, and BatchNorm, ReLU, pooling
and residual adds are included (about 2% on CIFAR nets). Published "FLOPs" are often multiply-adds
including padding: WRN-28-10 is 5.25G MACs there, 9.53G FLOPs here.
"""

import argparse
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from banjax import models


def _flops(lowered) -> float:
    """The 'flops' entry of a lowered (or, failing that, compiled) computation's cost analysis."""
    cost = lowered.cost_analysis()
    if not cost or "flops" not in cost:
        cost = lowered.compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"])


def summarize(spec: str, num_classes: int = 100, image_size: int = 32) -> dict:
    """{'params': int, 'flops': float}: parameters and eval forward FLOPs for one image."""
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    model = models.abstract_model(spec, num_classes)
    model.eval()
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    forward = jax.jit(lambda s, x_BxHxWxC: nnx.merge(graphdef, s)(x_BxHxWxC))
    return {"params": models.param_count(model), "flops": _flops(forward.lower(state, x))}


def _si(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _line(spec: str, params: int, flops: float | None = None) -> str:
    text = f"{spec:<24} params {params:>12,} ({_si(params):>7})"
    if flops is not None:
        text += f"  forward FLOPs/image {flops:>16,.0f} ({_si(flops)})"
    return text


def main(argv=None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m banjax.summary",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("spec", nargs="?", help="model spec, e.g. densenet-bc-80-120")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--list", action="store_true", help="list NAMED_SPECS with params")
    args = parser.parse_args(argv)
    if args.list:
        for spec in models.NAMED_SPECS:
            print(_line(spec, models.param_count(models.abstract_model(spec, args.num_classes))))
        return
    if args.spec is None:
        parser.error("give a model spec or --list")
    try:
        out = summarize(args.spec, args.num_classes, args.image_size)
    except ValueError as e:
        parser.error(str(e))
    print(_line(args.spec, out["params"], out["flops"]))
    print(
        f"(num_classes={args.num_classes}, image {args.image_size}x{args.image_size}x3, batch 1, "
        "eval mode; XLA cost analysis, multiply-add = 2 FLOPs)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
