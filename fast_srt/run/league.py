"""The opponent league (`--league.every K --league.size N --league.p-past P`, with `--roles per-role`).

- Every K steps, after the step's weight write, each role's adapter is copied (fp32 CPU tensors, a few MB) and
  served by the policy engine as a frozen LoRA request `{role}@{step}`, beside the two current adapters; at most N
  per role, the oldest dropped (removed from the engine). The engine is built with room for all of them
  (`max_loras` = 2 + 2N).
- Each game with an attacker turn is, with probability P, played against the past: one side (attacker or defender,
  50/50) is played by a snapshot of that role, drawn uniformly from the ones kept; the other side is the current
  adapter, and only it trains (the snapshot's turn is marked untrainable: it gives no sample, hence no gradient).
  A game on a verbatim seed (no attacker turn) always meets the current defender. The draw is seeded by (run seed,
  step, rank): a resumed run draws the same opponents.
- Logged per step: `league/past_games`, `league/snapshots` (per role), and each role's mean reward against current
  and against past opponents (`league/{role}_reward_vs_current`, `..._vs_past`); games.jsonl gives each game's
  `opponent` ("current" or the snapshot, e.g. "attacker@4").
- A checkpoint carries the snapshots (role, step, tensors); a resume serves them again, in order, as they were.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass

import torch

from fast_srt.config import LeagueConfig
from fast_srt.engine.engine import derive_seed
from fast_srt.game.rules import is_generated
from fast_srt.learner.batch import ROLE_IDS
from fast_srt.learner.lora import adapter_state_dict, write_peft_adapter

ROLES = tuple(ROLE_IDS)
SNAPSHOT_ID_BASE = 16  # snapshot LoRA ids: base + 2 x step + role id (the current adapters are 1 and 2)


@dataclass
class Snapshot:
    role: str
    step: int
    tensors: dict  # adapter_state_dict(model, role) at `step`, on the CPU
    request: object = None  # its LoRARequest on the policy engine

    @property
    def label(self) -> str:
        return f"{self.role}@{self.step}"


class League:
    """The snapshots kept per role, and the per-game opponent draw."""

    def __init__(self, cfg: LeagueConfig, engine, scale: float, base_dir: str = ""):
        self.cfg, self.engine, self.scale, self.base_dir = cfg, engine, scale, str(base_dir)
        self.snapshots: dict[str, list[Snapshot]] = {r: [] for r in ROLES}

    def due(self, step: int) -> bool:
        return bool(self.cfg.every) and step % self.cfg.every == 0

    def take(self, model, step: int) -> None:
        """Keep each role's adapter as it is now as the snapshot of `step`."""
        for role in ROLES:
            self._add(Snapshot(role, step, {k: v.detach().to("cpu", copy=True)
                                            for k, v in adapter_state_dict(model, role).items()}))

    def _add(self, snap: Snapshot) -> None:
        kept = self.snapshots[snap.role]
        while len(kept) >= self.cfg.size:  # the oldest leaves the engine first: the new one always has room
            self.engine.detach_adapter(kept.pop(0).request.lora_int_id)
        pairs = {k.removesuffix(".lora_A"): (v, snap.tensors[k.removesuffix("_A") + "_B"])
                 for k, v in snap.tensors.items() if k.endswith(".lora_A")}
        with tempfile.TemporaryDirectory(prefix="fast_srt-snapshot-") as d:  # read once by the engine
            write_peft_adapter(pairs, self.scale, d, self.base_dir)
            snap.request = self.engine.attach_adapter(
                d, name=snap.label, lora_int_id=SNAPSHOT_ID_BASE + 2 * snap.step + ROLE_IDS[snap.role],
                default=False)
        kept.append(snap)

    def draw(self, seeds, seed: int, step: int, rank: int = 0) -> list[Snapshot | None]:
        """Per game: the snapshot playing one of its sides, or None (both current). Three numbers are drawn for
        every game, so one game's draw never shifts another's."""
        rng = random.Random(derive_seed(seed, step, rank, "league"))
        out = []
        for _, data_type in seeds:
            u, side, pick = rng.random(), rng.choice(ROLES), rng.random()
            kept = self.snapshots[side]
            past = is_generated(data_type) and kept and u < self.cfg.p_past
            out.append(kept[int(pick * len(kept))] if past else None)
        return out

    @staticmethod
    def loras(draws: list[Snapshot | None], current: dict) -> dict[str, list]:
        """play_games' `lora`: per role, one LoRA request per game (the snapshot's where it plays that side)."""
        return {role: [d.request if d is not None and d.role == role else current[role] for d in draws]
                for role in ROLES}

    @staticmethod
    def mark(games, draws: list[Snapshot | None]) -> None:
        """Each game's opponent; a snapshot's turn is not trained (games_to_samples skips untrainable turns)."""
        for g, d in zip(games, draws):
            g.opponent = "current" if d is None else d.label
            if d is not None:
                getattr(g, d.role).trainable = False

    def metrics(self, games, draws: list[Snapshot | None]) -> dict:
        m: dict = {"league/past_games": sum(d is not None for d in draws),
                   "league/snapshots": len(self.snapshots[ROLES[0]])}
        for role in ROLES:
            other = ROLES[1 - ROLE_IDS[role]]
            kinds = (("current", lambda d: d is None), ("past", lambda d: d is not None and d.role == other))
            for kind, keep in kinds:
                rs = [getattr(g.rewards, role) for g, d in zip(games, draws)
                      if g.attacker is not None and keep(d) and not g.rewards.tie
                      and getattr(g.rewards, role) is not None]
                m[f"league/{role}_reward_vs_{kind}"] = sum(rs) / len(rs) if rs else None
        return m

    def state(self) -> list[dict]:
        """What a checkpoint carries (weights_only-loadable): every snapshot, oldest first per role."""
        return [{"role": s.role, "step": s.step, "tensors": s.tensors} for r in ROLES for s in self.snapshots[r]]

    def restore(self, state: list[dict]) -> None:
        for x in state:
            self._add(Snapshot(x["role"], int(x["step"]), {k: torch.as_tensor(v) for k, v in x["tensors"].items()}))
