"""The fine-tuning stage that ends a run when `train.finetune.epochs > 0` (MPL's last stage).

It is an ordinary supervised run in `output_dir/finetune`, started from the finished run's evaluated
network (the student's EMA under MPL), so it checkpoints, resumes and reports like any run. As in
kekmodel's MPL, dropout is removed, the schedule is constant and there is no EMA.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from dist_ssl.config import Config, FinetuneConfig, MethodConfig, OptimConfig, RolesConfig, role_model


def finetune_config(cfg: Config, trained: Path, num_labeled: int) -> Config:
    """The config of the fine-tuning run that follows `cfg`, starting from checkpoint `trained`."""
    from dist_ssl.methods import get_method

    ft = cfg.train.finetune
    steps_per_epoch = ft.steps_per_epoch or math.ceil(num_labeled / ft.batch_size)
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, batch_size=ft.batch_size, unlabeled_batch_ratio=0),
        model=dataclasses.replace(role_model(cfg, get_method(cfg.method.name).eval_role), dropout=0.0),
        optim=OptimConfig(name="sgd", lr=ft.lr, momentum=ft.momentum, nesterov=ft.nesterov, weight_decay=ft.weight_decay,
                          schedule="constant", warmup_steps=0, grad_clip=0.0),
        method=MethodConfig(name="supervised"),
        roles=RolesConfig(),
        train=dataclasses.replace(cfg.train, output_dir=str(Path(cfg.train.output_dir) / "finetune"), epochs=ft.epochs, init_from=str(trained),
                                  steps_per_epoch=steps_per_epoch,
                                  resume="never" if cfg.train.resume == "never" else "auto", ema_decay=0.0, finetune=FinetuneConfig()),
    )
