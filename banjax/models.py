"""CIFAR-style DenseNet(-BC), Wide-ResNet and pre-activation ResNet in Flax NNX (NHWC).

Conventions shared by every family (they reproduce the published parameter counts, see tests):
- convolutions have no bias and use He-normal init with fan_out (as in the reference Torch and
  PyTorch code of Huang et al., Zagoruyko & Komodakis and He et al.); BatchNorm scale 1, bias 0,
  momentum 0.9 (PyTorch's 0.1), eps 1e-5; the classifier has a bias initialised to 0;
- all nets are pre-activation: units are BN-ReLU-Conv and the net ends with BN-ReLU-global average
  pool-Linear; `model.stem` is the first conv and `model.head` the classifier;
- parameters are float32, `dtype` is the compute dtype, logits are always float32;
- the model holds no RNG state: dropout keys come from the `rngs` call argument.
"""

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Per-block layer counts for the BAN DenseNet-BC nets whose depth is not 6n+4 (Furlanello et al.
# 2018 name them depth-growth). Rule: floor((depth-4)/6) layers per block, the remainder on the last
# block, so depth = 2 * sum(layers) + 4 still holds. Counts (abstract eval) vs the paper:
#   densenet-bc-90-60  (14, 14, 15): 15,688,300 (100 classes) / 15,547,810 (10) vs 16.1M: -2.6%
#   densenet-bc-80-80  (12, 12, 14): 22,716,020 (100 classes) / 22,546,730 (10) vs 22.4M: +1.4%
#   densenet-bc-80-120 (12, 12, 14): 50,885,980 (100 classes) / 50,632,090 (10) vs 50.4M: +1.0%
# (12, 13, 13) for depth 80 gives +2.3% / +1.9%; plain floor (14,14,14) / (12,12,12) gives -5.7% to
# -6.2%, outside 5%. densenet-bc-112-33 divides (18 per block): 6,987,916 (100) / 6,892,786 (10)
# vs the paper's 6.3M (+9% / +11%); 17 per block would give 6,270,851 (10 classes), i.e. 6.3M.
BAN_LAYOUTS: dict[int, tuple[int, int, int]] = {90: (14, 14, 15), 80: (12, 12, 14)}

NAMED_SPECS: tuple[str, ...] = (
    # BAN DenseNet-BC teachers/students (Furlanello et al. Tables 1-3).
    "densenet-bc-112-33",
    "densenet-bc-90-60",
    "densenet-bc-80-80",
    "densenet-bc-80-120",
    # Huang et al. DenseNets.
    "densenet-bc-100-12",
    "densenet-bc-250-24",
    "densenet-bc-190-40",
    "densenet-40-12",
    "densenet-100-12",
    "densenet-100-24",
    # Wide-ResNets (Zagoruyko & Komodakis; BAN Tables 1 and 3).
    "wrn-28-1",
    "wrn-28-2",
    "wrn-28-5",
    "wrn-28-10",
    "wrn-40-4",
    "wrn-16-8",
    # Pre-activation ResNets (He et al. 2016); 14-W are BAN Table 5 style students.
    "preact-resnet-20",
    "preact-resnet-56",
    "preact-resnet-110",
    "preact-resnet-164",
    "preact-resnet-1001",
    "preact-resnet-14-0.5",
    "preact-resnet-14-1",
)

_VALID = (
    "valid forms: 'densenet-bc-D-K' (D = 6n+4, or 90/80 via the BAN layout table), "
    "'densenet-D-K' (D = 3n+4), 'wrn-D-W' (D = 6n+4, W > 0), "
    "'preact-resnet-D[-W]' (D = 6n+2 basic, or D = 9n+2 >= 164 bottleneck, W > 0)"
)
_INT = r"(\d+)"
_NUM = r"(\d+(?:\.\d+)?)"
_PATTERNS = {
    "densenet-bc": re.compile(rf"densenet-bc-{_INT}-{_INT}"),
    "densenet": re.compile(rf"densenet-{_INT}-{_INT}"),
    "wrn": re.compile(rf"wrn-{_INT}-{_NUM}"),
    "preact-resnet": re.compile(rf"preact-resnet-{_INT}(?:-{_NUM})?"),
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A parsed architecture spec."""

    name: str
    family: str  # 'densenet' | 'wrn' | 'preact-resnet'
    depth: int
    layers: tuple[int, ...]  # dense layers / residual blocks per stage
    bottleneck: bool = False  # DenseNet-BC or bottleneck pre-act ResNet
    growth: int = 0  # DenseNet growth rate k
    width: float = 1.0  # WRN width factor / pre-act ResNet width multiplier


def _bad(spec: str, why: str) -> ValueError:
    return ValueError(f"Invalid model spec {spec!r}: {why}; {_VALID}.")


def parse_spec(spec: str) -> ModelSpec:
    """Parses 'densenet-bc-D-K', 'densenet-D-K', 'wrn-D-W' or 'preact-resnet-D[-W]'."""
    if not isinstance(spec, str):
        raise _bad(repr(spec), "not a string")
    s = spec.strip().lower()
    family = next((f for f, p in _PATTERNS.items() if p.fullmatch(s)), None)
    if family is None:
        raise _bad(spec, "unknown family or malformed numbers")
    groups = _PATTERNS[family].fullmatch(s).groups()
    depth = int(groups[0])
    if family.startswith("densenet"):
        growth = int(groups[1])
        if growth < 1:
            raise _bad(spec, f"growth rate must be >= 1, got {growth}")
        bc = family == "densenet-bc"
        per = 6 if bc else 3
        if (depth - 4) % per == 0 and depth - 4 >= per:
            layers = ((depth - 4) // per,) * 3
        elif bc and depth in BAN_LAYOUTS:
            layers = BAN_LAYOUTS[depth]
        else:
            raise _bad(spec, f"depth {depth} is not {per}n+4 with n >= 1")
        return ModelSpec(s, "densenet", depth, layers, bottleneck=bc, growth=growth)
    width = float(groups[1]) if groups[1] is not None else 1.0
    if width <= 0:
        raise _bad(spec, f"width must be > 0, got {groups[1]}")
    if family == "wrn":
        if (depth - 4) % 6 or depth < 10:
            raise _bad(spec, f"depth {depth} is not 6n+4 with n >= 1")
        return ModelSpec(s, "wrn", depth, ((depth - 4) // 6,) * 3, width=width)
    if depth >= 164 and (depth - 2) % 9 == 0:
        return ModelSpec(s, family, depth, ((depth - 2) // 9,) * 3, bottleneck=True, width=width)
    if (depth - 2) % 6 == 0 and depth >= 8:
        return ModelSpec(s, family, depth, ((depth - 2) // 6,) * 3, width=width)
    raise _bad(spec, f"depth {depth} is neither 6n+2 (basic) nor 9n+2 >= 164 (bottleneck)")


class Frozen(nnx.Variable):
    """A parameter that is not trained (not an nnx.Param, so optimisers over nnx.Param skip it)."""


@functools.partial(jax.jit, static_argnums=1)
def _normal(key, n):
    return jax.random.normal(key, (n,), jnp.float32)


def _he_normal(key, shape, dtype=jnp.float32):
    """He-normal init with fan_out = receptive field * out channels (untruncated).

    Draws a power-of-two block of normals and slices it: on CPU, eager creation then compiles one
    random program per size bucket instead of one per kernel shape (~4x faster model creation).
    """
    n, fan_out = math.prod(shape), math.prod(shape[:-2]) * shape[-1]
    flat = _normal(key, 1 << max(n - 1, 0).bit_length())
    return (jax.lax.slice(flat, (0,), (n,)).reshape(shape) * math.sqrt(2.0 / fan_out)).astype(dtype)


_lecun = jax.jit(nnx.initializers.lecun_normal(), static_argnums=(1, 2))


def _conv(cin, cout, k, stride=1, *, dtype, rngs):
    """Bias-free kxk conv with torch-style symmetric padding k//2 and He fan_out init."""
    pad = ((k // 2, k // 2), (k // 2, k // 2))
    return nnx.Conv(
        cin,
        cout,
        (k, k),
        strides=stride,
        padding=pad,
        use_bias=False,
        dtype=dtype,
        kernel_init=_he_normal,
        rngs=rngs,
    )


def _bn(c, *, dtype, rngs):
    return nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs)


def _fold(key, i):
    return None if key is None else jax.random.fold_in(key, i)


class Unit(nnx.Module):
    """Pre-activation unit BN-ReLU-Conv, then dropout."""

    def __init__(self, cin, cout, k, stride=1, dropout=0.0, *, dtype, rngs):
        self.bn = _bn(cin, dtype=dtype, rngs=rngs)
        self.conv = _conv(cin, cout, k, stride, dtype=dtype, rngs=rngs)
        self.drop = nnx.Dropout(dropout)

    def __call__(self, x, key=None):
        return self.drop(self.conv(nnx.relu(self.bn(x))), rngs=key)


class DenseLayer(nnx.Module):
    """[BN-ReLU-1x1 conv to 4k] BN-ReLU-3x3 conv to k, concatenated onto the input."""

    def __init__(self, cin, growth, bottleneck, dropout, *, dtype, rngs):
        units = []
        if bottleneck:
            units.append(Unit(cin, 4 * growth, 1, dropout=dropout, dtype=dtype, rngs=rngs))
            cin = 4 * growth
        units.append(Unit(cin, growth, 3, dropout=dropout, dtype=dtype, rngs=rngs))
        self.units = nnx.List(units)

    def __call__(self, x_BxHxWxC, key=None):
        y = x_BxHxWxC
        for i, unit in enumerate(self.units):
            y = unit(y, _fold(key, i))
        return jnp.concatenate([x_BxHxWxC, y], axis=-1)


class Transition(nnx.Module):
    """BN-ReLU-1x1 conv-2x2 average pool."""

    def __init__(self, cin, cout, *, dtype, rngs):
        self.unit = Unit(cin, cout, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x, key=None):
        return nnx.avg_pool(self.unit(x), (2, 2), strides=(2, 2))


class Basic(nnx.Module):
    """Pre-activation basic block (WRN / ResNet): BN-ReLU-3x3, BN-ReLU-dropout-3x3, plus shortcut."""

    def __init__(self, cin, cout, stride, dropout, *, dtype, rngs):
        self.bn1 = _bn(cin, dtype=dtype, rngs=rngs)
        self.conv1 = _conv(cin, cout, 3, stride, dtype=dtype, rngs=rngs)
        self.bn2 = _bn(cout, dtype=dtype, rngs=rngs)
        self.drop = nnx.Dropout(dropout)
        self.conv2 = _conv(cout, cout, 3, dtype=dtype, rngs=rngs)
        proj = cin != cout or stride != 1  # 1x1 conv shortcut on the pre-activation when shapes change
        self.short = _conv(cin, cout, 1, stride, dtype=dtype, rngs=rngs) if proj else None

    def __call__(self, x, key=None):
        o = nnx.relu(self.bn1(x))
        s = x if self.short is None else self.short(o)
        y = self.drop(nnx.relu(self.bn2(self.conv1(o))), rngs=key)
        return self.conv2(y) + s


class Bottleneck(nnx.Module):
    """Pre-activation bottleneck block: BN-ReLU-1x1, BN-ReLU-3x3 (stride), BN-ReLU-1x1 to 4x width."""

    def __init__(self, cin, mid, stride, *, dtype, rngs):
        cout = 4 * mid
        self.bn1 = _bn(cin, dtype=dtype, rngs=rngs)
        self.conv1 = _conv(cin, mid, 1, dtype=dtype, rngs=rngs)
        self.unit2 = Unit(mid, mid, 3, stride, dtype=dtype, rngs=rngs)
        self.unit3 = Unit(mid, cout, 1, dtype=dtype, rngs=rngs)
        proj = cin != cout or stride != 1
        self.short = _conv(cin, cout, 1, stride, dtype=dtype, rngs=rngs) if proj else None

    def __call__(self, x, key=None):
        del key  # no dropout in pre-activation ResNets
        o = nnx.relu(self.bn1(x))
        s = x if self.short is None else self.short(o)
        return self.unit3(self.unit2(self.conv1(o))) + s


def _tracing(rngs: nnx.Rngs) -> bool:
    return isinstance(rngs.params.count.get_value(), jax.core.Tracer)


def _new(cls, *args, rngs, **kwargs):
    """cls(*args, rngs=rngs, **kwargs), in a nested nnx.jit when already tracing.

    Under a trace (abstract_model's nnx.eval_shape, or a jitted create) every RngCount update costs
    time linear in the size of the enclosing trace, which makes deep nets quadratic (ResNet-1001:
    minutes). A per-block nested trace keeps it linear; eager creation is unchanged.
    """
    if not _tracing(rngs):
        return cls(*args, rngs=rngs, **kwargs)
    return nnx.jit(lambda r: cls(*args, rngs=r, **kwargs))(rngs)


def _densenet_blocks(spec, c, dropout, *, dtype, rngs):
    """Dense layers with transitions in between; returns (blocks, out_channels)."""
    compression = 0.5 if spec.bottleneck else 1.0
    blocks = []
    for stage, n in enumerate(spec.layers):
        for _ in range(n):
            blocks.append(_new(DenseLayer, c, spec.growth, spec.bottleneck, dropout, dtype=dtype, rngs=rngs))
            c += spec.growth
        if stage < len(spec.layers) - 1:
            out = int(math.floor(c * compression))
            blocks.append(_new(Transition, c, out, dtype=dtype, rngs=rngs))
            c = out
    return blocks, c


def _resnet_blocks(spec, c, dropout, *, dtype, rngs):
    """WRN / pre-act ResNet stages of residual blocks; returns (blocks, out_channels)."""
    scale = spec.width  # WRN: stage widths 16W, 32W, 64W; pre-act ResNet: all widths times W
    widths = [max(1, int(round(16 * m * scale))) for m in (1, 2, 4)]
    blocks = []
    for stage, (n, w) in enumerate(zip(spec.layers, widths, strict=True)):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            if spec.bottleneck:
                blocks.append(_new(Bottleneck, c, w, stride, dtype=dtype, rngs=rngs))
                c = 4 * w
            else:
                blocks.append(_new(Basic, c, w, stride, dropout, dtype=dtype, rngs=rngs))
                c = w
    return blocks, c


def _remat_apply(block, x, key):
    return block(x, key)


_remat_call = nnx.remat(_remat_apply)


def _key(rngs):
    """One dropout key from an nnx.Rngs, RngStream or key (None stays None)."""
    if rngs is None or isinstance(rngs, jax.Array):
        return rngs
    if isinstance(rngs, nnx.Rngs):
        return rngs.dropout()
    if isinstance(rngs, nnx.RngStream):
        return rngs()
    raise ValueError(f"rngs must be None, an nnx.Rngs, an nnx.RngStream or a key, got {type(rngs)}")


class Net(nnx.Module):
    """Stem conv, a sequence of blocks, optional projection, BN-ReLU-pool-Linear head."""

    def __init__(
        self,
        spec: ModelSpec,
        num_classes: int,
        *,
        dtype,
        remat,
        dropout,
        stem_features,
        head_features,
        in_channels,
        rngs,
    ):
        self.spec_name = spec.name
        self.dtype = dtype
        self.remat = remat
        if spec.family == "densenet":
            default_stem = 2 * spec.growth if spec.bottleneck else 16
        elif spec.family == "wrn":
            default_stem = 16
        else:
            default_stem = max(1, int(round(16 * spec.width)))
        c = default_stem if stem_features is None else stem_features
        self.stem = _conv(in_channels, c, 3, dtype=dtype, rngs=rngs)
        build = _densenet_blocks if spec.family == "densenet" else _resnet_blocks
        blocks, c = build(spec, c, dropout, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List(blocks)
        if head_features is not None and head_features != c:
            self.proj = Unit(c, head_features, 1, dtype=dtype, rngs=rngs)
            c = head_features
        else:
            self.proj = None
        self.bn = _bn(c, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(c, num_classes, dtype=dtype, kernel_init=_lecun, rngs=rngs)

    def __call__(self, x_BxHxWxC, *, rngs=None):
        key = _key(rngs)
        x = self.stem(x_BxHxWxC.astype(self.dtype))
        for i, block in enumerate(self.blocks):
            k = _fold(key, i)
            x = _remat_call(block, x, k) if self.remat else block(x, k)
        if self.proj is not None:
            x = self.proj(x)
        x = nnx.relu(self.bn(x))
        feats_BxF = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return self.head(feats_BxF.astype(self.dtype)).astype(jnp.float32)


def _check_positive(name, value):
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be None or a positive int, got {value!r}")


def create(
    spec: str,
    num_classes: int,
    *,
    rngs: nnx.Rngs,
    dtype=jnp.float32,
    remat: bool = False,
    dropout: float = 0.0,
    stem_features: int | None = None,
    head_features: int | None = None,
    in_channels: int = 3,
) -> nnx.Module:
    """Builds the model named by `spec` (see parse_spec) for `in_channels` inputs; starts in train mode."""
    parsed = parse_spec(spec)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if parsed.bottleneck and parsed.family == "preact-resnet" and dropout:
        raise ValueError(f"dropout={dropout} is not supported by bottleneck {spec!r}; use 0.0")
    _check_positive("stem_features", stem_features)
    _check_positive("head_features", head_features)
    _check_positive("in_channels", in_channels)
    return Net(
        parsed,
        num_classes,
        dtype=dtype,
        remat=remat,
        dropout=dropout,
        stem_features=stem_features,
        head_features=head_features,
        in_channels=in_channels,
        rngs=rngs,
    )


def abstract_model(spec: str, num_classes: int, **create_kwargs) -> nnx.Module:
    """The model with ShapeDtypeStruct leaves (nnx.eval_shape, no real init)."""
    rngs = create_kwargs.pop("rngs", None)
    rngs = nnx.Rngs(0) if rngs is None else rngs
    return nnx.eval_shape(lambda r: create(spec, num_classes, rngs=r, **create_kwargs), rngs)


def _is_var(x):
    return isinstance(x, nnx.Variable)


def param_count(model_or_state) -> int:
    """Number of scalars in nnx.Param and Frozen leaves (a pytree of plain arrays counts whole)."""
    tree = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
    leaves = jax.tree.leaves(tree, is_leaf=_is_var)
    if any(_is_var(v) for v in leaves):
        leaves = [v.get_value() for v in leaves if isinstance(v, (nnx.Param, Frozen))]
    return int(sum(np.prod(np.shape(v), dtype=np.int64) for v in leaves))


def _check_shapes(dst: nnx.Module, src: nnx.Module, what: str, hint: str) -> None:
    """Raises ValueError unless dst and src have the same kernel and bias shapes."""
    for name in ("kernel", "bias"):
        s, d = getattr(src, name, None), getattr(dst, name, None)
        s_shape = None if s is None else tuple(s.shape)
        d_shape = None if d is None else tuple(d.shape)
        if s_shape != d_shape:
            raise ValueError(
                f"transplant: teacher {what}.{name} shape {s_shape} != student "
                f"{what}.{name} shape {d_shape}; {hint}"
            )


def _freeze_copy(dst: nnx.Module, src: nnx.Module) -> None:
    """Replaces dst.kernel/bias with Frozen copies of src's."""
    for name in ("kernel", "bias"):
        s = getattr(src, name, None)
        if s is not None:
            setattr(dst, name, Frozen(jnp.array(s.get_value(), copy=True)))


def transplant(student: nnx.Module, teacher: nnx.Module) -> None:
    """Copies the teacher's stem conv and classifier into the student and freezes them (Frozen)."""
    stem_c, (head_f, classes) = teacher.stem.kernel.shape[-1], teacher.head.kernel.shape
    hint = (
        f"create the student with stem_features={stem_c}, head_features={head_f} "
        f"(and num_classes={classes}) to match the teacher"
    )
    _check_shapes(student.stem, teacher.stem, "stem", hint)
    _check_shapes(student.head, teacher.head, "head", hint)
    _freeze_copy(student.stem, teacher.stem)
    _freeze_copy(student.head, teacher.head)
