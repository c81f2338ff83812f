"""All training: one loop, two tasks on it (teachers, students), and what they share.

    kdcache train-teacher --manifest data_manifests/synthetic.parquet --arch mlp --loss mse --out models/mse.pt
    kdcache distill --method kd --mentors caches/train/ce.zarr --manifest data_manifests/synthetic.parquet \\
        --student mlp --out models/kd.pt
    kdcache evaluate models/kd.pt --manifest data_manifests/synthetic.parquet --split test

    from pipeline.train import DistillConfig, TeacherConfig, distill, evaluate_checkpoint, train_teacher

    config.py    TrainConfig: the settings every run shares, and the --resume rule
    sampling.py  the batch order and its DDP split (teachers, students, streaming caches)
    loop.py      fit: the one training loop; SGD + cosine schedule; resumable train state
    teacher.py   the teacher task (ce / mse losses)
    student.py   the student task (distillation methods)
    targets.py   where a student's targets come from: cache stores or live teachers, one protocol
    loader.py    DistillLoader: (x, y, cached targets) batches for your own training loop
    evaluate.py  accuracy / cross-entropy / distance to a known posterior; evaluate_checkpoint

The device and precision policy is ``pipeline.runtime``'s, shared with caching.
"""

from pipeline.train.evaluate import EvaluateConfig, evaluate_checkpoint
from pipeline.train.loader import DistillLoader
from pipeline.train.student import DistillConfig, distill, parse_options, student_paths
from pipeline.train.teacher import TeacherConfig, train_teacher

__all__ = ["DistillConfig", "DistillLoader", "EvaluateConfig", "TeacherConfig", "distill", "evaluate_checkpoint",
           "parse_options", "student_paths", "train_teacher"]
