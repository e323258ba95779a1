"""What runs training: the loop (:mod:`.engine`), schedules (:mod:`.schedules`), pretraining
(:mod:`.pretrain`) and the supervised ViT initialisation (:mod:`.vision_init`).

The model core (``codis/*.py``) never imports this package; it imports the core and
:mod:`codis.data`.
"""

from codis.train.engine import (MetricsCallback, Runtime, StepLoss, autocast, fit, init_runtime,
                                latest_checkpoint, seed_everything)
from codis.train.pretrain import DataConfig, PretrainConfig, pretrain
from codis.train.schedules import (OptimConfig, TrainConfig, distillation_alpha, global_batch,
                                   learning_rate, scale_schedule, scaled_lr, task_schedule,
                                   with_changes)

__all__ = ["DataConfig", "MetricsCallback", "OptimConfig", "PretrainConfig", "Runtime", "StepLoss",
           "TrainConfig", "autocast", "distillation_alpha", "fit", "global_batch", "init_runtime",
           "latest_checkpoint", "learning_rate", "pretrain", "scale_schedule", "scaled_lr",
           "seed_everything", "task_schedule", "with_changes"]
