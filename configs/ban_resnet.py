"""BAN across families (paper Table 5): DenseNet-BC-90-60 teacher, Wide-ResNet / pre-act ResNet students.

Command:  python main.py --config configs/ban_resnet.py:preact-resnet-14-1 --workdir runs/ban-resnet
          (argument: the student spec, e.g. preact-resnet-14-0.5, preact-resnet-14-1, wrn-16-4)
          Reuse a trained 90-60 teacher: --config.teacher_checkpoint=runs/ban-90-60/gen_0/checkpoints
The students take over the teacher's first convolution and classifier, frozen (transplant=True).
Runtime: as configs/ban_densenet.py. Expected (paper, test error %): teacher 17.69; BAN students
          Pre-ResNet-14-0.5 18.8, Pre-ResNet-14-1 17.39 (the paper's own student layouts differ from ours).
"""

from configs import ban_densenet


def get_config(arg: str = "preact-resnet-14-1"):
    c = ban_densenet.get_config("90-60")
    c.student_model = arg
    c.transplant = True
    c.num_generations = 1
    return c
