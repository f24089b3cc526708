"""Quickstart: offline digits (scikit-learn), a small DenseNet-BC, teacher + 3 students, full report.

Command:  python main.py --config configs/quickstart.py --workdir runs/quickstart
Runtime:  49.5 s on 2 CPU cores (measured with the command above; README, "Quickstart output").
Expected: each generation 0.5-2.5% test error on the 360 held-out digits; Ens*3 about 0.3%.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.dataset = "digits"
    c.data_dir = ""
    c.model = "densenet-bc-22-8"
    c.student_model = ""
    c.transplant = False
    c.teacher_checkpoint = ""
    c.num_generations = 3
    c.num_epochs = 15
    c.num_steps = 0
    c.batch_size = 64
    c.eval_batch_size = 128
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 0.1
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = True
    c.optimizer.weight_decay = 5e-4
    c.optimizer.schedule = "piecewise"
    c.optimizer.boundaries = (0.3, 0.6, 0.8)
    c.optimizer.decay = 0.2
    c.loss = "ban+l"
    c.temperature = 1.0
    c.label_weight = 1.0
    c.kl_weight = 1.0
    c.teacher_signal = "bank"
    c.bank_views = 0  # all 9 views of digits' pad-1 crop
    c.bank_dtype = "float16"
    c.dtype = "float32"
    c.remat = False
    c.dropout = 0.0
    c.steps_per_dispatch = 1  # CPU steps are compute-bound: fusing gains <= 8% (docs/performance.md)
    c.checkpoint_every = 100
    c.log_every = 50
    c.seed = 0
    return c
