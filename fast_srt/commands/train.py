"""`fast-srt train [PRESET] [--options]`: parses the preset and its overrides, then runs fast_srt.run.trainer.train.
"""

from __future__ import annotations

from fast_srt.config import PRESETS, TrainConfig
from fast_srt.errors import UserError


def parse_train_args(argv: list[str]) -> TrainConfig:
    import tyro

    preset = "cpu_default"
    if argv and not argv[0].startswith("-"):
        preset, argv = argv[0], argv[1:]
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    desc = "Self-play RL training in one process. Presets (first argument): " + "; ".join(
        f"{k}: {' '.join((f.__doc__ or '').split())}" for k, f in PRESETS.items())
    return tyro.cli(TrainConfig, default=PRESETS[preset](), args=argv, prog=f"fast-srt train {preset}",
                    description=desc)


def train_main(argv: list[str]) -> None:
    from fast_srt.eval.training import TrainingEval
    from fast_srt.run.trainer import train

    train(parse_train_args(argv), make_eval=TrainingEval)  # the eval during training (--eval-every)

