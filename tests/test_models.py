"""Tests for banjax.models: specs, shapes, published counts, modes, remat, bf16, transplant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from banjax import models

TINY = ("densenet-bc-10-4", "densenet-7-4", "wrn-10-1", "preact-resnet-8")
X = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))


def _vars(tree):
    return jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, nnx.Variable))


def _maxdiff(a, b):
    return max(
        float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@nnx.jit
def _fwd(model, x, key):
    return model(x, rngs=key)


@pytest.mark.parametrize(
    "spec,layers,bottleneck",
    [
        ("densenet-bc-100-12", (16, 16, 16), True),
        ("densenet-40-12", (12, 12, 12), False),
        ("densenet-bc-90-60", models.BAN_LAYOUTS[90], True),
        ("densenet-bc-80-120", models.BAN_LAYOUTS[80], True),
        ("wrn-28-10", (4, 4, 4), False),
        ("preact-resnet-110", (18, 18, 18), False),
        ("preact-resnet-164", (18, 18, 18), True),
        ("preact-resnet-14-0.5", (2, 2, 2), False),
    ],
)
def test_parse_spec(spec, layers, bottleneck):
    s = models.parse_spec(spec)
    assert s.layers == layers and s.bottleneck == bottleneck
    if s.family == "densenet":  # DenseNet-BC: 2 convs per layer; plain: 1; +4 (stem, 2 trans, fc)
        assert (2 if bottleneck else 1) * sum(layers) + 4 == s.depth
    elif bottleneck:
        assert 9 * layers[0] + 2 == s.depth
    else:
        assert 6 * layers[0] + (4 if s.family == "wrn" else 2) == s.depth


def test_named_specs_parse():
    for spec in models.NAMED_SPECS:
        assert models.parse_spec(spec).name == spec


@pytest.mark.parametrize(
    "spec",
    [
        "densenet-bc-101-12",
        "wrn-27-10",
        "resnet-50",
        "densenet-bc-x-12",
        "densenet-bc-4-12",
        "densenet-bc-100-0",
        "wrn-28-0",
        "preact-resnet-100",
        "preact-resnet-47",
        "",
    ],
)
def test_invalid_spec(spec):
    with pytest.raises(ValueError, match="valid forms") as err:
        models.parse_spec(spec)
    assert repr(spec) in str(err.value)


def test_invalid_create_args():
    for kwargs in ({"dropout": 1.0}, {"stem_features": 0}, {"head_features": 2.5}):
        with pytest.raises(ValueError, match=str(list(kwargs.values())[0])):
            models.create("wrn-10-1", 5, rngs=nnx.Rngs(0), **kwargs)
    with pytest.raises(ValueError, match="num_classes"):
        models.create("wrn-10-1", 0, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tiny():
    return {s: models.create(s, 5, rngs=nnx.Rngs(0)) for s in TINY}


@pytest.mark.parametrize("spec", TINY)
def test_forward_shape_dtype_state(tiny, spec):
    model = tiny[spec]
    y = _fwd(model, X, None)
    assert y.shape == (2, 5) and y.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(y)))
    assert isinstance(model.stem, nnx.Conv) and model.stem.kernel.shape[:3] == (3, 3, 3)
    assert isinstance(model.head, nnx.Linear) and model.head.kernel.shape[1] == 5
    # No RNG state: Param + BatchStat is the whole state.
    _, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    assert not _vars(rest) and not _vars(nnx.state(model, nnx.RngState))
    assert all(v.get_value().dtype == jnp.float32 for v in _vars(params))
    assert models.param_count(model) == sum(int(np.prod(v.shape)) for v in _vars(params))
    assert models.param_count(params) == models.param_count(model)


def test_param_count_forms():
    model = models.create("preact-resnet-8", 3, rngs=nnx.Rngs(0))
    abstract = models.abstract_model("preact-resnet-8", 3)
    assert all(isinstance(v.get_value(), jax.ShapeDtypeStruct) for v in _vars(nnx.state(abstract)))
    n = models.param_count(model)
    assert models.param_count(abstract) == n
    assert models.param_count(nnx.to_pure_dict(nnx.state(model, nnx.Param))) == n
    assert models.param_count({"w": np.zeros((3, 4)), "b": np.zeros(5)}) == 17


# (spec, num_classes, published, decimals): round(count / 1e6, decimals) == published.
PUBLISHED = [
    ("densenet-bc-100-12", 10, 0.8, 1),
    ("densenet-bc-250-24", 10, 15.3, 1),
    ("densenet-bc-190-40", 10, 25.6, 1),
    ("densenet-40-12", 10, 1.0, 1),
    ("densenet-100-24", 10, 27.2, 1),
    ("wrn-28-10", 10, 36.5, 1),
    ("wrn-40-4", 10, 8.9, 1),
    ("wrn-16-8", 10, 11.0, 1),
    ("wrn-28-1", 100, 0.38, 2),
    ("wrn-28-2", 100, 1.48, 2),
    ("wrn-28-5", 100, 9.16, 2),
    ("preact-resnet-164", 10, 1.7, 1),
]


@pytest.mark.parametrize("spec,classes,published,decimals", PUBLISHED)
def test_published_counts(spec, classes, published, decimals):
    n = models.param_count(models.abstract_model(spec, classes))
    assert round(n / 1e6, decimals) == published, n


@pytest.mark.parametrize(
    "spec,classes,published,tol",
    [
        ("preact-resnet-1001", 10, 10.2e6, 0.02),
        ("densenet-bc-90-60", 100, 16.1e6, 0.05),
        ("densenet-bc-80-80", 100, 22.4e6, 0.05),
        ("densenet-bc-80-120", 100, 50.4e6, 0.05),
    ],
)
def test_counts_within(spec, classes, published, tol):
    n = models.param_count(models.abstract_model(spec, classes))
    assert abs(n / published - 1) <= tol, n


def test_wrn_count_closed_form():
    """WRN-D-W count vs an independent closed form (bias-free convs, BN scale+bias, fc bias)."""
    d, w, c = 16, 2, 7
    n, widths = (d - 4) // 6, [16, 16 * w, 32 * w, 64 * w]
    total = 27 * 16 + 2 * widths[-1] + widths[-1] * c + c
    for i in range(3):
        cin, cout = widths[i], widths[i + 1]
        for j in range(n):
            a = cin if j == 0 else cout
            total += 2 * a + 9 * a * cout + 2 * cout + 9 * cout * cout + (a * cout if a != cout else 0)
    assert models.param_count(models.abstract_model(f"wrn-{d}-{w}", c)) == total


def test_bn_train_updates_running_stats_eval_does_not():
    model = models.create("wrn-10-1", 5, rngs=nnx.Rngs(0))
    bn = model.blocks[0].bn1
    stem_out = np.asarray(model.stem(X))
    y_train = _fwd(model, X, None)
    # Running mean after one train step: 0.9 * 0 + 0.1 * batch mean of the BN's input.
    np.testing.assert_allclose(bn.mean.get_value(), 0.1 * stem_out.mean((0, 1, 2)), atol=1e-5)
    np.testing.assert_allclose(bn.var.get_value(), 0.9 + 0.1 * stem_out.var((0, 1, 2)), rtol=1e-4)
    model.eval()
    before = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    y_eval = _fwd(model, X, None)
    assert _maxdiff(before, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))) == 0.0
    assert float(jnp.max(jnp.abs(y_eval - y_train))) > 1e-3
    # Eval mode normalises with running stats, so an example's logits do not depend on its batch.
    np.testing.assert_allclose(_fwd(model, X[:1], None), y_eval[:1], atol=1e-5)
    assert not np.allclose(_fwd(model.train() or model, X[:1], None), y_train[:1], atol=1e-3)


def _key(seed):
    return jax.random.key(seed, impl="rbg")  # any key works; rbg compiles faster than threefry


def test_dropout_modes():
    model = models.create("wrn-10-1", 5, rngs=nnx.Rngs(0), dropout=0.5)
    plain = models.create("wrn-10-1", 5, rngs=nnx.Rngs(0))
    model.eval()
    plain.eval()
    e = _fwd(model, X, None)  # eval: dropout is the identity, rngs are not needed or used
    assert bool(jnp.all(e == _fwd(model, X, _key(1)))) and bool(jnp.all(e == _fwd(plain, X, None)))
    model.train()
    with pytest.raises(ValueError, match="rngs"):
        _fwd(model, X, None)
    a, b, c = _fwd(model, X, _key(1)), _fwd(model, X, _key(1)), _fwd(model, X, _key(2))
    assert bool(jnp.all(a == b)) and float(jnp.max(jnp.abs(a - c))) > 1e-4
    d = _fwd(model, X, nnx.Rngs(dropout=_key(1)))  # an nnx.Rngs works too
    assert d.shape == (2, 5) and float(jnp.max(jnp.abs(d - e))) > 1e-4


@pytest.mark.parametrize("spec,dropout", [("densenet-7-4", 0.2), ("wrn-10-1", 0.3)])
def test_remat_same_outputs_and_grads(spec, dropout):
    def loss(model, x):
        return jnp.sum(model(x, rngs=_key(0)) ** 2)

    grad = nnx.jit(nnx.value_and_grad(loss))
    outs = []
    for remat in (False, True):
        model = models.create(spec, 5, rngs=nnx.Rngs(0), dropout=dropout, remat=remat)
        graphdef, state = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda s, g=graphdef: nnx.merge(g, s)(X, rngs=_key(0)))(state)
        n_remat = sum(e.primitive.name in ("remat", "remat2", "checkpoint") for e in jaxpr.eqns)
        assert n_remat == (len(model.blocks) if remat else 0)  # one checkpoint per block
        value, grads = grad(model, X)
        outs.append((value, nnx.to_pure_dict(grads), nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))))
    assert outs[0][0] == outs[1][0]
    assert _maxdiff(outs[0][1], outs[1][1]) < 1e-6
    assert _maxdiff(outs[0][2], outs[1][2]) < 1e-6
    assert _maxdiff(outs[0][1], jax.tree.map(jnp.zeros_like, outs[0][1])) > 0  # grads not trivial


def test_bf16_compute():
    f32 = models.create("densenet-bc-10-4", 5, rngs=nnx.Rngs(0))
    b16 = models.create("densenet-bc-10-4", 5, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    assert all(v.get_value().dtype == jnp.float32 for v in _vars(nnx.state(b16)))
    assert b16.stem.dtype == jnp.bfloat16 and b16.head.dtype == jnp.bfloat16
    y32, y16 = _fwd(f32, X, None), _fwd(b16, X, None)
    assert y16.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(y16 - y32))) <= 0.05 * float(jnp.max(jnp.abs(y32))) + 0.05
    assert bool(jnp.any(y16 != y32))  # bf16 really was used


def test_stem_and_head_features():
    model = models.create("wrn-10-1", 5, rngs=nnx.Rngs(0), stem_features=7, head_features=11)
    assert model.stem.kernel.shape == (3, 3, 3, 7) and model.head.kernel.shape == (11, 5)
    assert model.proj is not None and model.proj.conv.kernel.shape == (1, 1, 64, 11)
    assert _fwd(model, X, None).shape == (2, 5)
    same = models.create("wrn-10-1", 5, rngs=nnx.Rngs(0), head_features=64)
    assert same.proj is None


def test_transplant():
    teacher = models.create("densenet-bc-10-4", 5, rngs=nnx.Rngs(1))
    stem_c, head_f = teacher.stem.kernel.shape[-1], teacher.head.kernel.shape[0]
    wrong = models.create("preact-resnet-8", 5, rngs=nnx.Rngs(2))
    with pytest.raises(ValueError, match=f"stem_features={stem_c}, head_features={head_f}") as e:
        models.transplant(wrong, teacher)
    assert str(teacher.stem.kernel.shape) in str(e.value)
    assert isinstance(wrong.stem.kernel, nnx.Param)  # nothing changed on failure

    student = models.create(
        "preact-resnet-8", 5, rngs=nnx.Rngs(2), stem_features=stem_c, head_features=head_f
    )
    n_before = models.param_count(student)
    models.transplant(student, teacher)
    for mine, theirs in (
        (student.stem.kernel, teacher.stem.kernel),
        (student.head.kernel, teacher.head.kernel),
        (student.head.bias, teacher.head.bias),
    ):
        assert isinstance(mine, models.Frozen) and not isinstance(mine, nnx.Param)
        np.testing.assert_array_equal(mine.get_value(), theirs.get_value())
    trainable = nnx.state(student, nnx.Param)
    assert "stem" not in trainable and "head" not in trainable
    assert models.param_count(student) == n_before  # Frozen still counted
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(X)), argnums=nnx.DiffState(0, nnx.Param)))(student)
    assert "head" not in nnx.to_pure_dict(grads) and "stem" not in nnx.to_pure_dict(grads)
    teacher.head.bias.set_value(teacher.head.bias.get_value() + 1.0)  # a copy, not a reference
    assert not np.allclose(student.head.bias.get_value(), teacher.head.bias.get_value())


def test_in_channels_sets_the_stem_input_width():
    model = models.create("densenet-bc-10-4", 10, rngs=nnx.Rngs(0), in_channels=1)
    assert model.stem.kernel.value.shape == (3, 3, 1, 8)
    assert model(jnp.zeros((2, 8, 8, 1))).shape == (2, 10)
    with pytest.raises(ValueError, match="in_channels"):
        models.create("densenet-bc-10-4", 10, rngs=nnx.Rngs(0), in_channels=0)
