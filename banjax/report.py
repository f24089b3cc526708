"""Final report from plain results dicts: results.json, a paper-style Markdown table and a plot."""

import contextlib
import json
import math
import numbers
import os
import tempfile

ROLES = ("teacher", "student")
LOSS_KEYS = ("train/loss", "loss")
ERROR_KEYS = ("eval/error", "test/error")


def _bad(field, value, valid):
    raise ValueError(f"results{field}={value!r} is invalid: expected {valid}.")


def _check_int(field, value, minimum=0):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        _bad(field, value, f"an integer >= {minimum}")


def _check_metrics(field, entry):
    err, nll = entry.get("test_error"), entry.get("test_nll")
    if (isinstance(err, bool) or not isinstance(err, numbers.Real) or not math.isfinite(err)
            or not 0 <= err <= 1):
        _bad(f"{field}.test_error", err, "a fraction in [0, 1]")
    if (isinstance(nll, bool) or not isinstance(nll, numbers.Real) or not math.isfinite(nll)
            or nll < 0):
        _bad(f"{field}.test_nll", nll, "a finite number >= 0")


def _check_generation(i, g):
    field = f".generations[{i}]"
    if not isinstance(g, dict):
        _bad(field, g, "a dict")
    _check_int(f"{field}.index", g.get("index"))
    if g.get("role") not in ROLES:
        _bad(f"{field}.role", g.get("role"), f"one of {ROLES}")
    for key in ("model", "checkpoint"):
        if not isinstance(g.get(key), str) or not g[key]:
            _bad(f"{field}.{key}", g.get(key), "a non-empty string")
    _check_int(f"{field}.params", g.get("params"))
    _check_metrics(field, g)
    expected = "teacher" if g["index"] == 0 else "student"
    if g["role"] != expected:
        _bad(f"{field}.role", g["role"], f"{expected!r} for generation index {g['index']}")


def _check_ensemble(i, e, indices):
    field = f".ensembles[{i}]"
    if not isinstance(e, dict):
        _bad(field, e, "a dict")
    members = e.get("members")
    valid = f"a non-empty list of distinct generation indices from {sorted(indices)}"
    if not isinstance(members, list | tuple) or not members:
        _bad(f"{field}.members", members, valid)
    for m in members:
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m not in indices:
            _bad(f"{field}.members", members, valid)
    if len(set(members)) != len(members):
        _bad(f"{field}.members", members, valid)
    _check_metrics(field, e)


def validate_results(results: dict) -> None:
    """Raises ValueError naming the first field that does not follow the results schema."""
    if not isinstance(results, dict):
        _bad("", results, "a dict with 'dataset', 'generations' and 'ensembles'")
    if not isinstance(results.get("dataset"), str) or not results["dataset"]:
        _bad(".dataset", results.get("dataset"), "a non-empty string")
    gens = results.get("generations")
    if not isinstance(gens, list) or not gens:
        _bad(".generations", gens, "a non-empty list of generation dicts")
    for i, g in enumerate(gens):
        _check_generation(i, g)
    indices = [g["index"] for g in gens]
    if len(set(indices)) != len(indices):
        _bad(".generations", indices, "distinct generation indices")
    if 0 not in indices:
        _bad(".generations", indices, "a teacher generation with index 0")
    ens = results.get("ensembles", [])
    if not isinstance(ens, list):
        _bad(".ensembles", ens, "a list of ensemble dicts")
    for i, e in enumerate(ens):
        _check_ensemble(i, e, set(indices))


def _pct(fraction):
    return f"{100 * fraction:.2f}"


def _mparams(n):
    return f"{n / 1e6:.2f}M"


def _row(cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header, rows):
    return "\n".join([_row(header), _row(["---"] * len(header))] + [_row(r) for r in rows])


def _members(e):
    return "+".join(str(m) for m in e["members"])


def markdown_table(results: dict) -> str:
    """Paper-style summary table (errors in %), a per-generation table and, if any, ensembles."""
    validate_results(results)
    gens = sorted(results["generations"], key=lambda g: g["index"])
    teacher, students = gens[0], gens[1:]
    ensembles = results.get("ensembles", [])
    by_members = {frozenset(e["members"]): e for e in ensembles}
    models = list(dict.fromkeys(g["model"] for g in students))
    network, params = teacher["model"], _mparams(teacher["params"])
    if models and models != [teacher["model"]]:
        first = [next(g for g in students if g["model"] == m) for m in models]
        network += " -> " + ", ".join(models)
        params += " -> " + ", ".join(_mparams(g["params"]) for g in first)
    header, row = ["Network", "Params", "Teacher"], [network, params, _pct(teacher["test_error"])]
    for g in students:
        header.append(f"BAN-{g['index']}")
        row.append(_pct(g["test_error"]))
    last = students[-1]["index"] if students else 0
    for k in range(2, last + 1):
        e = by_members.get(frozenset(range(1, k + 1)))
        if e is not None:
            header.append(f"Ens*{k}")
            row.append(_pct(e["test_error"]))
    e = by_members.get(frozenset(range(last + 1))) if last >= 1 else None
    if e is not None:
        header.append(f"Ens*{last}+T")
        row.append(_pct(e["test_error"]))
    parts = [_table(header, [row])]
    parts.append(_table(
        ["Generation", "Role", "Model", "Params", "Test error (%)", "Test NLL"],
        [[g["index"], g["role"], g["model"], _mparams(g["params"]), _pct(g["test_error"]),
          f"{g['test_nll']:.4f}"] for g in gens]))
    if ensembles:
        parts.append(_table(
            ["Ensemble members", "Test error (%)", "Test NLL"],
            [[_members(e), _pct(e["test_error"]), f"{e['test_nll']:.4f}"] for e in ensembles]))
    return "\n\n".join(parts) + "\n"


def _first_key(records, keys):
    return next((k for k in keys if any(k in r for r in records)), None)


def _check_curves(curves):
    if curves is None:
        return {}
    if not isinstance(curves, dict):
        raise ValueError(f"curves must be a dict generation -> records, got {type(curves)}.")
    out = {}
    for g, records in curves.items():
        try:
            index = int(g)
        except (TypeError, ValueError):
            raise ValueError(f"curves key {g!r} must be a generation index (int).") from None
        for i, r in enumerate(records):
            if not isinstance(r, dict) or "step" not in r:
                raise ValueError(f"curves[{g!r}][{i}]={r!r} must be a dict with a 'step' key.")
        out[index] = records
    return out


def _plot_errors(ax, results):
    """Test error (%) by generation, the teacher starred; ensembles as dashed lines + diamonds."""
    gens = sorted(results["generations"], key=lambda g: g["index"])
    x = [g["index"] for g in gens]
    y = [100 * g["test_error"] for g in gens]
    ax.plot(x, y, "o-", color="C0", label="generations")
    ax.plot(x[:1], y[:1], "*", color="C3", markersize=14, label="teacher")
    for xi, yi in zip(x, y, strict=True):
        ax.annotate(f"{yi:.2f}", (xi, yi), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=8)
    for i, e in enumerate(results.get("ensembles", [])):
        ye, color = 100 * e["test_error"], f"C{(i + 4) % 10}"
        ax.axhline(ye, color=color, linestyle="--", linewidth=1)
        ax.plot([max(e["members"])], [ye], "D", color=color, label=f"ens {_members(e)}: {ye:.2f}")
    ax.set_xticks(x)
    ax.margins(x=0.1, y=0.15)
    ax.set_xlabel("generation (0 = teacher)")
    ax.set_ylabel("test error (%)")
    ax.set_title(f"{results['dataset']}: test error by generation")
    ax.legend(fontsize=8)


def _plot_curves(ax, curves):
    """Train loss vs step per generation (solid) and eval error % on a twin axis (dashed)."""
    ax_err = None
    for g, records in sorted(curves.items()):
        color = f"C{g % 10}"
        key = _first_key(records, LOSS_KEYS)
        if key is not None:
            pts = [(r["step"], r[key]) for r in records if key in r]
            ax.plot(*zip(*pts, strict=True), color=color, label=f"gen {g} {key}")
        key = _first_key(records, ERROR_KEYS)
        if key is not None:
            if ax_err is None:
                ax_err = ax.twinx()
                ax_err.set_ylabel("eval error % (dashed)")
            pts = [(r["step"], 100 * r[key]) for r in records if key in r]
            ax_err.plot(*zip(*pts, strict=True), "--.", color=color, label=f"gen {g} {key}")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (solid)")
    ax.set_title("training curves")
    handles = [h for a in (ax, ax_err) if a is not None for h in a.get_legend_handles_labels()[0]]
    if handles:
        ax.legend(handles=handles, fontsize=8)


def plot(results: dict, curves: dict | None, path) -> None:
    """Saves a PNG: test error by generation (+ ensembles) and, with curves, training curves."""
    from matplotlib.figure import Figure  # Agg canvas; no pyplot global state

    validate_results(results)
    curves = _check_curves(curves)
    fig = Figure(figsize=(12 if curves else 6, 4.5), layout="constrained")
    axes = fig.subplots(1, 2 if curves else 1, squeeze=False)[0]
    _plot_errors(axes[0], results)
    if curves:
        _plot_curves(axes[1], curves)
    with open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


def _to_builtin(obj):
    if hasattr(obj, "item"):  # NumPy / JAX scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _tmp_path(workdir, name):
    fd, tmp = tempfile.mkstemp(dir=workdir, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)
    return tmp


def write_report(workdir: str, results: dict, curves: dict | None = None) -> dict[str, str]:
    """Writes results.json, results.md and results.png atomically; returns {'json','md','png'}."""
    validate_results(results)
    curves = _check_curves(curves)
    os.makedirs(workdir, exist_ok=True)
    text_json = json.dumps(results, indent=2, default=_to_builtin) + "\n"
    text_md = (f"# Born-Again Networks on {results['dataset']}\n\n" + markdown_table(results)
               + "\n![results](results.png)\n")
    final = {k: os.path.join(workdir, f"results.{k}") for k in ("png", "md", "json")}
    tmps = {}
    try:
        for k in final:
            tmps[k] = _tmp_path(workdir, f"results.{k}")
        plot(results, curves, tmps["png"])
        for k, text in (("md", text_md), ("json", text_json)):
            with open(tmps[k], "w") as f:
                f.write(text)
        for k in final:  # JSON last: it is the record of truth
            os.replace(tmps.pop(k), final[k])
    finally:
        for tmp in tmps.values():
            with contextlib.suppress(OSError):
                os.remove(tmp)
    return {k: final[k] for k in ("json", "md", "png")}
