"""Born-Again Networks: a teacher, its student generations, their ensembles and the paper's table.

  python main.py --config configs/quickstart.py --workdir runs/quickstart
  python main.py --config configs/ban_densenet.py:90-60 --config.num_generations=3

Rerunning on the same workdir goes on where it stopped. Exit status: 0 done, 2 bad input (nothing run),
1 training failed (non-finite loss), 128+signal when stopped by SIGTERM/SIGINT (checkpoint saved).
"""

import os
import shlex
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from banjax import data, ensemble, generations, logs, report, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory; default runs/<config name>.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first (TPU pods, multi-node).")
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
flags.mark_flags_as_required(["config"])


def default_workdir() -> str:
    """runs/<config file name>[-<arg>]."""
    path = config_flags.get_config_filename(FLAGS["config"])
    name, _, arg = path.partition(":")
    name = os.path.splitext(os.path.basename(name))[0]
    return os.path.join("runs", f"{name}-{arg}" if arg else name)


def results_dict(config, gens, per_gen, ens) -> dict:
    """results.json content: every generation and every ensemble."""
    rows = []
    for g, scores in zip(gens, per_gen):
        rows.append({**g.summary(), "test_error": scores["test_error"],
                     "test_nll": scores["test_nll"]})
    return {"dataset": config.dataset, "generations": rows, "ensembles": ens}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.multihost:
        jax.distributed.initialize()
    config = FLAGS.config
    workdir = FLAGS.workdir or default_workdir()
    hint = shlex.join([sys.executable, *sys.argv] + ([] if FLAGS.workdir else
                                                     [f"--workdir={workdir}"]))
    # Orbax logs every checkpoint operation at INFO: keep the run's own log readable.
    logging.get_absl_handler().addFilter(lambda r: "/orbax/" not in r.pathname)
    mesh = data.make_mesh()
    logging.info("devices: %s", jax.devices())
    logging.info("config:\n%s", config)
    try:
        generations.validate(config, mesh)
        ds = data.load(config.dataset, os.path.expanduser(config.data_dir) or None)
        generations.validate(config, mesh, ds)
        generations.prepare_workdir(config, workdir)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.info("dataset %s: %d train, %d test, %d classes, %d views", ds.name,
                 len(ds.train_labels), len(ds.test_labels), ds.num_classes, ds.views.num_views)
    arrays = generations.device_arrays(ds, mesh)
    try:
        gens = generations.run_chain(config, workdir, ds, arrays, mesh, resume_hint=hint)
    except train.Interrupted as e:
        print(str(e), file=sys.stderr)
        return 128 + e.signum
    except (train.NonFiniteLoss, generations.ConfigMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    per_gen, ens = ensemble.evaluate(gens, arrays, ds.test_labels, config.eval_batch_size, mesh,
                                     config.dtype)
    results = results_dict(config, gens, per_gen, ens)
    curves = {}
    for g in gens:
        path = os.path.join(workdir, f"gen_{g.index}", "metrics.jsonl")
        curves[g.index] = logs.latest_records(logs.read_jsonl(path)) if os.path.exists(path) else []
    paths = report.write_report(workdir, results, curves)
    print(report.markdown_table(results))
    print("report: " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
