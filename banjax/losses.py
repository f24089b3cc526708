"""Losses for Born Again Networks: label CE, dark-knowledge KL, CWTM and DKPP (pure, jittable)."""

import numbers

import jax
import jax.numpy as jnp

MODES = ("ban+l", "ban", "cwtm", "dkpp")


def _f32(x):
    """Casts to at least float32 (bank logits may be stored as float16/bfloat16)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_logits(name, logits):
    if logits.ndim != 2:
        raise ValueError(f"{name} must have shape (batch, classes), got shape {logits.shape}.")


def _check_temperature(temperature):
    if isinstance(temperature, numbers.Real) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")


def _check_same_shape(student_logits, teacher):
    if teacher.shape != student_logits.shape:
        raise ValueError(f"teacher shape {teacher.shape} must equal student logits shape "
                         f"{student_logits.shape}.")


def cross_entropy(logits_BxC, labels_B, weights_B=None):
    """Label cross-entropy: mean over examples, or sum(w * ce) for batch-normalised weights."""
    logits_BxC = _f32(logits_BxC)
    labels_B = jnp.asarray(labels_B)
    _check_logits("logits_BxC", logits_BxC)
    if labels_B.shape != logits_BxC.shape[:1]:
        raise ValueError(f"labels_B shape {labels_B.shape} must be ({logits_BxC.shape[0]},) "
                         "to match logits.")
    logp_BxC = jax.nn.log_softmax(logits_BxC, axis=-1)
    ce_B = -jnp.take_along_axis(logp_BxC, labels_B[:, None].astype(jnp.int32), axis=-1)[:, 0]
    if weights_B is None:
        return ce_B.mean()
    weights_B = _f32(weights_B)
    if weights_B.shape != ce_B.shape:
        raise ValueError(f"weights_B shape {weights_B.shape} must be {ce_B.shape} to match logits.")
    return jnp.sum(weights_B * ce_B)


def _kl_from_log_probs(student_logits, logq_BxC, q_BxC, temperature):
    """T^2 * mean_b sum_c q (log q - log softmax(s/T)); zero-prob teacher entries contribute 0."""
    logp_BxC = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    terms_BxC = jnp.where(q_BxC > 0, q_BxC * (logq_BxC - logp_BxC), 0.0)
    return temperature**2 * terms_BxC.sum(axis=-1).mean()


def distillation_kl(student_logits, teacher_logits, temperature=1.0):
    """KL(p_T || p_S) of softened distributions, batch-mean, times T^2; no gradient into teacher."""
    _check_temperature(temperature)
    student_logits, teacher_logits = _f32(student_logits), _f32(teacher_logits)
    _check_logits("student_logits", student_logits)
    _check_same_shape(student_logits, teacher_logits)
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    logq_BxC = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    return _kl_from_log_probs(student_logits, logq_BxC, jnp.exp(logq_BxC), temperature)


def distillation_kl_from_probs(student_logits, teacher_probs, temperature=1.0):
    """KL(q || softmax(s/T)) * T^2 for given (already softened) teacher probs q; batch-mean."""
    _check_temperature(temperature)
    student_logits, teacher_probs = _f32(student_logits), _f32(teacher_probs)
    _check_logits("student_logits", student_logits)
    _check_same_shape(student_logits, teacher_probs)
    q_BxC = jax.lax.stop_gradient(teacher_probs)
    logq_BxC = jnp.log(jnp.where(q_BxC > 0, q_BxC, 1.0))  # xlogy-style: 0 * log 0 := 0
    return _kl_from_log_probs(student_logits, logq_BxC, q_BxC, temperature)


def cwtm_weights(teacher_logits_BxC):
    """Confidence weights: teacher max probability normalised to sum to 1 over the batch."""
    teacher_logits_BxC = jax.lax.stop_gradient(_f32(teacher_logits_BxC))
    _check_logits("teacher_logits_BxC", teacher_logits_BxC)
    pmax_B = jax.nn.softmax(teacher_logits_BxC, axis=-1).max(axis=-1)
    return pmax_B / pmax_B.sum()


def dkpp_permute(key, teacher_probs_BxC):
    """Keeps each row's argmax entry in place and randomly permutes the others among themselves."""
    teacher_probs_BxC = jnp.asarray(teacher_probs_BxC)
    _check_logits("teacher_probs_BxC", teacher_probs_BxC)
    B, C = teacher_probs_BxC.shape
    is_max_BxC = jax.nn.one_hot(teacher_probs_BxC.argmax(axis=-1), C, dtype=bool)
    # Slot order: argmax first, then the other slots in index order.
    slots_BxC = jnp.argsort(jnp.where(is_max_BxC, -1, jnp.arange(C)), axis=-1)
    # Source order: argmax first, then the other slots in a random order.
    u_BxC = jax.random.uniform(key, (B, C))
    sources_BxC = jnp.argsort(jnp.where(is_max_BxC, -1.0, u_BxC), axis=-1)
    values_BxC = jnp.take_along_axis(teacher_probs_BxC, sources_BxC, axis=-1)
    return jnp.take_along_axis(values_BxC, jnp.argsort(slots_BxC, axis=-1), axis=-1)


def ban_loss(student_logits, labels, teacher_logits=None, *, mode="ban+l", temperature=1.0,
             label_weight=1.0, kl_weight=1.0, key=None):
    """BAN training loss for one batch; returns (loss, metrics) with 'loss', 'ce' and maybe 'kl'.

    teacher_logits=None (generation 0) gives label CE whatever the mode. Otherwise:
    'ban+l': label_weight * ce + kl_weight * kl; 'ban': kl_weight * kl;
    'cwtm': label_weight * CE weighted by cwtm_weights(teacher) (teacher at T=1);
    'dkpp': kl_weight * KL(dkpp_permute(key, softmax(teacher / T)) || student), key required.
    metrics['kl'] is always the KL to the unpermuted teacher; dkpp adds metrics['kl_dkpp'].
    """
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; valid modes: {MODES}.")
    _check_temperature(temperature)
    student_logits = _f32(student_logits)
    ce = cross_entropy(student_logits, labels)
    if teacher_logits is None:
        return ce, {"loss": ce, "ce": ce}
    teacher_logits = jax.lax.stop_gradient(_f32(teacher_logits))
    kl = distillation_kl(student_logits, teacher_logits, temperature)
    metrics = {"ce": ce, "kl": kl}
    if mode == "ban+l":
        loss = label_weight * ce + kl_weight * kl
    elif mode == "ban":
        loss = kl_weight * kl
    elif mode == "cwtm":
        loss = label_weight * cross_entropy(student_logits, labels, cwtm_weights(teacher_logits))
    else:
        if key is None:
            raise ValueError("mode 'dkpp' needs a PRNG key (key=None given).")
        q_BxC = dkpp_permute(key, jax.nn.softmax(teacher_logits / temperature, axis=-1))
        metrics["kl_dkpp"] = distillation_kl_from_probs(student_logits, q_BxC, temperature)
        loss = kl_weight * metrics["kl_dkpp"]
    metrics["loss"] = loss
    return loss, metrics
