"""BAN on CIFAR-100 with DenseNet-BC (paper Table 2): teacher + 3 students, the WRN recipe.

Command:  python main.py --config configs/ban_densenet.py:90-60 --workdir runs/ban-90-60
          (argument: 112-33 (default), 90-60, 80-80 or 80-120; loss variants by override, e.g.
          --config.loss=ban --config.temperature=1 --config.bank_views=16)
Prepare CIFAR-100 once (needs internet): see README, "Datasets".
Runtime: not yet measured (no accelerator so far). Estimate for 112-33: 2.17 TFLOP per step at batch 128
          (`python -m banjax.bench --model densenet-bc-112-33 --batch 128 --compile-only`) x 78,000 steps
          per generation, plus 42 PFLOP per 162-view bank: about 0.8 EFLOP for the chain, i.e. about 4.5 h
          on one GPU sustaining 50 TFLOP/s. The larger nets scale with their FLOPs (README table).
Expected (paper, test error %): 112-33 teacher 18.25, BAN-1 17.61, BAN-2 17.22, BAN-3 16.59,
          Ens*2 15.77, Ens*3 15.68; the other nets in README's table.
"""

import ml_collections


def get_config(arg: str = "112-33"):
    c = ml_collections.ConfigDict()
    c.dataset = "cifar100"
    c.data_dir = ""  # "" = the TFDS default (~/tensorflow_datasets)
    c.model = f"densenet-bc-{arg}"
    c.student_model = ""  # "" = same as model
    c.transplant = False  # students take over the teacher's first conv and classifier (Table 5)
    c.teacher_checkpoint = ""  # a generation's checkpoints/ dir: skip training the teacher
    c.num_generations = 3  # students after the teacher
    c.num_epochs = 200
    c.num_steps = 0  # > 0 overrides num_epochs
    c.batch_size = 128
    c.eval_batch_size = 500
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 0.1
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = True
    c.optimizer.weight_decay = 5e-4
    c.optimizer.schedule = "piecewise"  # or "cosine"
    c.optimizer.boundaries = (0.3, 0.6, 0.8)
    c.optimizer.decay = 0.2
    c.loss = "ban+l"  # ban+l | ban | cwtm | dkpp
    c.temperature = 1.0
    c.label_weight = 1.0
    c.kl_weight = 1.0
    c.teacher_signal = "bank"  # bank | online
    c.bank_views = 0  # 0 = all 162 views (exact); K = a fixed sample of K views per image
    c.bank_dtype = "float16"
    c.dtype = "float32"  # compute dtype; bfloat16 on GPU/TPU
    c.remat = False
    c.dropout = 0.0
    c.steps_per_dispatch = 1
    c.checkpoint_every = 1000
    c.log_every = 100
    c.seed = 0
    return c
