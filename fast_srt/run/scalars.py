"""The run's scalars beyond metrics.jsonl: TensorBoard event files in the run directory (on whenever the
`tensorboard` package is installed: the cpu and gpu extras install it) and Weights & Biases (only when the run's
config names a `wandb_project`, and wandb is installed; the config refuses the setting otherwise).

Every numeric field of a metrics record except "step" becomes a scalar of that name at that step (booleans as
0/1; None, a gap, is skipped). `tensorboard --logdir runs/` shows each run directory as one run. Older events are
hidden the way metrics.jsonl drops its lines (TensorBoard's purge_step): a new run purges every earlier event in
its directory; a resumed run purges those from the checkpoint's step on (a killed run may have logged steps past
its checkpoint) and writes the checkpoint step's record again, so the curves match metrics.jsonl.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from fast_srt.errors import UserError


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def scalar_values(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, str)}


class ScalarSinks:
    """TensorBoard and W&B writers for one run directory, opened at the first record (after the trainer has
    written the run's config.json, which holds wandb_project)."""

    def __init__(self, run_dir: Path, purge_from: int = 0, replay: list[dict] | None = None):
        self.run_dir, self.purge_from, self.replay = Path(run_dir), purge_from, replay or []
        self.tb = self.wandb = None
        self.opened = False

    def _open(self) -> None:
        self.opened = True
        if tensorboard_available():
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.run_dir), purge_step=self.purge_from, flush_secs=30)
        cfg_path = self.run_dir / "config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        if cfg.get("wandb_project"):
            try:
                import wandb
            except ImportError:
                raise UserError("wandb_project is set but wandb is not installed; run `pip install wandb` or "
                                "drop --wandb-project") from None
            self.wandb = wandb.init(project=cfg["wandb_project"], name=self.run_dir.name, dir=str(self.run_dir),
                                    config=cfg)
        for record in self.replay:
            self._write(record)

    def _write(self, record: dict) -> None:
        step, values = record.get("step"), scalar_values(record)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def write(self, record: dict) -> None:
        if not self.opened:
            self._open()
        self._write(record)
