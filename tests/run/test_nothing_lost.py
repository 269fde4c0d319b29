"""Nothing lost, nothing stale: a new run never deletes an earlier run's logs, cache keys cover everything that
changes their result, attacker_only's frozen defender is the original base model, an empty step still moves the
LR schedule, torchrun means are pooled over every rank's games and tokens, and each rank's SFT stream is its own
and checkpointed. The replay after a kill is tested with the kill matrix (test_train.py)."""

import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch



@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("FAST_SRT_CACHE", str(d))
    return d


# ------------------------------------------------------------------------------------------------ logs

def test_run_dir_with_logs_and_no_checkpoint_is_refused_and_keeps_its_logs(tmp_path):
    """A run killed before its first checkpoint leaves metrics.jsonl and games.jsonl: a new run there is refused
    in one line (before any model is resolved) and the logs stay byte for byte."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "reward/defender_mean": 0.5}\n')
    (run / "games.jsonl").write_text('{"step": 1, "seed": "s"}\n')
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAST_SRT_")}
    p = subprocess.run([sys.executable, "-m", "fast_srt.cli", "train", "--run-dir", str(run), "--model.model",
                        str(tmp_path / "no-such-model")], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "metrics.jsonl and games.jsonl of an earlier run" in lines[0], p.stderr
    assert "pass a new --run-dir" in lines[0]
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


# ------------------------------------------------------------------------------------------------ cache keys

def _fake_model(d, size=5 << 20):
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    (d / "model.safetensors").write_bytes(os.urandom(size))
    return d


def _flip_middle_byte(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1
    st = path.stat()
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a rewrite: another modification time


def test_model_identity_sees_a_change_anywhere_in_a_weight_file(tmp_path, cache):
    """Two same-size weight files that differ only in the middle: other identities for the warm-up's base and the
    probe's judge model (the first and last MiB alone would collide)."""
    from fast_srt.engine.probe_judge import model_fingerprint
    from fast_srt.learner.warmup import base_identity

    d = _fake_model(tmp_path / "m")
    ident, fp = base_identity(d), model_fingerprint(d)
    assert base_identity(d) == ident and model_fingerprint(d) == fp  # stable (the second from the digest cache)
    _flip_middle_byte(d / "model.safetensors")
    assert base_identity(d) != ident
    assert model_fingerprint(d) != fp
    copy = shutil.copytree(d, tmp_path / "copy")
    assert base_identity(copy) == base_identity(d)  # content, not the path


def test_warmup_key_covers_the_rendered_samples(tiny_model_dir, cache, monkeypatch):
    """An edited defender instruction, attacker format or chat template changes what the warm-up trains on, so it
    changes the key; the parsed data records alone are the same."""
    import fast_srt.game.rules as rules
    from fast_srt.config import WarmupConfig
    from fast_srt.learner import warmup

    wcfg = WarmupConfig(steps=2, batch_size=2)
    d, a = warmup.load_warmup_data(wcfg)
    d, a = d[:4], a[:4]
    key = warmup.warmup_key(tiny_model_dir, wcfg, "float32", d, a)
    monkeypatch.setattr(rules, "DEFENDER_INSTRUCTION_COT", rules.DEFENDER_INSTRUCTION_COT + " Be brief.")
    assert warmup.warmup_key(tiny_model_dir, wcfg, "float32", d, a) != key
    monkeypatch.undo()
    assert warmup.warmup_key(tiny_model_dir, wcfg, "float32", d, a) == key
    monkeypatch.setattr(rules, "ATTACKER_FORMAT_COT", rules.ATTACKER_FORMAT_COT.replace("<think>", "<reason>"))
    assert warmup.warmup_key(tiny_model_dir, wcfg, "float32", d, a) != key


def test_probe_key_covers_tokenizer_chat_template_and_dtype(tiny_model_dir, tmp_path, cache):
    from fast_srt.engine.probe_judge import probe_key

    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    key = probe_key(copy, "float32")
    assert probe_key(copy, "bfloat16") != key  # the hidden states come in the engine's dtype
    tc = copy / "tokenizer_config.json"
    cfg = json.loads(tc.read_text())
    cfg["chat_template"] = cfg.get("chat_template", "") + "{# another template #}"
    tc.write_text(json.dumps(cfg))
    assert probe_key(copy, "float32") != key
    shutil.copy(tiny_model_dir / "tokenizer_config.json", tc)
    assert probe_key(copy, "float32") == key
    tok = copy / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"<|im_end|>"', '"<|im_stop|>"', 1))
    assert probe_key(copy, "float32") != key


# ------------------------------------------------------------------------------------------------ frozen defender

class _FakeEngine:
    def __init__(self, model_dir, **kw):
        self.model_dir, self.name, self.adapter = str(model_dir), kw.get("name"), None
        self.tokenizer = None

    def base_model(self):
        from fast_srt.engine.engine import BaseModelView

        return BaseModelView(self)


@pytest.mark.parametrize("judge", ["rule:vowel_refusal", "original"])
def test_attacker_only_frozen_defender_is_the_original_base(tmp_path, monkeypatch, judge):
    """Under the format warm-up the policy's base is the warmed checkpoint; the frozen defender stays the original
    base model (as in `fast-srt eval`), on the judge's engine when that holds it."""
    import fast_srt.engine.placement as placement
    from fast_srt.config import GameConfig, ModelConfig

    monkeypatch.setattr(placement, "Engine", _FakeEngine)
    monkeypatch.setattr(placement, "Judge", lambda engine, **kw: types.SimpleNamespace(engine=engine))
    warm, orig = tmp_path / "warmup-k", tmp_path / "base"
    mcfg = ModelConfig(judge_model=judge if judge.startswith("rule:") else str(orig))
    engines = placement.build_engines(mcfg, GameConfig(mode="attacker_only"), trains=True, seed=0, base_dir=warm,
                                      judge_dir=None if judge.startswith("rule:") else orig, defender_dir=orig)
    assert engines.policy.model_dir == str(warm)
    assert engines.frozen_defender.model_dir == str(orig)
    if not judge.startswith("rule:"):
        assert engines.frozen_defender is engines.judge.engine  # one engine holds the original base
    lora = placement.build_engines(ModelConfig(judge_model="rule:vowel_refusal"), GameConfig(mode="attacker_only"),
                                   trains=True, seed=0, base_dir=warm, defender_dir=orig, lora_rank=4)
    assert lora.frozen_defender.model_dir == str(orig)  # not the adapter engine's warmed base


def test_trainer_gives_the_frozen_defender_the_original_base(tiny_model_dir, tmp_path, monkeypatch):
    import fast_srt.run.trainer as trainer
    from fast_srt.commands.train import parse_train_args

    cfg = parse_train_args(["attacker_only", "--model.model", str(tiny_model_dir), "--model.judge-model",
                            "rule:vowel_refusal", "--model.dtype", "float32", "--warmup.steps", "1",
                            "--run-dir", str(tmp_path / "run"), "--algo.kl-coef", "0"])
    warm = shutil.copytree(tiny_model_dir, tmp_path / "warmup-k")
    monkeypatch.setattr(trainer, "warmed_base", lambda cfg, base, judge: (warm, judge, cfg.model, "k"))
    seen = {}

    class Stop(Exception):
        pass

    def build_engines(*a, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(trainer, "build_engines", build_engines)
    with pytest.raises(Stop):
        trainer.setup_run(cfg)
    assert seen["base_dir"] == warm and seen["defender_dir"] == tiny_model_dir


# ------------------------------------------------------------------------------------------------ the schedule

def test_schedule_advances_on_a_step_in_which_no_sample_survives(monkeypatch):
    """Every game a tie: no update runs, and the step's update slots still pass on the LR schedule, so the cosine
    ends at its floor on the run's last planned update."""
    import fast_srt.run.trainer as trainer
    from fast_srt.config import TrainConfig
    from fast_srt.learner.policy import build_scheduler

    cfg = TrainConfig()
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = build_scheduler(opt, 40, 0, 0.1)
    learner = types.SimpleNamespace(device=torch.device("cpu"), scheduler=sched, total_updates=40)
    stats = types.SimpleNamespace(role_adapters={})  # a shared policy: no per-role adapters
    engines = types.SimpleNamespace(snapshot=lambda: {}, since=lambda snap: {}, policy=stats, frozen_defender=None,
                                    judge=types.SimpleNamespace(parse_failures=0, truncated=0, too_long=0))
    run = types.SimpleNamespace(cfg=cfg, engines=engines, learner=learner, ranks=trainer.distributed.Ranks(),
                                pool=types.SimpleNamespace(group_batch=lambda n, k: ([], [])), options=None,
                                sampling=None, reward_fn=None, league=None)
    monkeypatch.setattr(trainer, "play_games", lambda *a, **k: [])
    status = types.SimpleNamespace(phase=lambda *a: None, line=lambda *a: None)
    before = sched.last_epoch
    metrics, _ = trainer.train_step(run, 1, status)
    assert metrics["optim/skipped_updates"] == cfg.optim.updates_per_step
    assert sched.last_epoch == before + cfg.optim.updates_per_step


# ------------------------------------------------------------------------------------------------ torchrun

def test_torchrun_means_are_pooled_over_every_ranks_games_and_tokens(monkeypatch):
    """Rank 0 judged 6 games and trained 300 loss tokens, rank 1 judged 2 and trained 100: the step's means weigh
    them so (a mean of the two ranks' means would weigh them equally)."""
    from fast_srt.run import distributed

    per_rank = [{"step": 1, "reward/defender_mean": 1.0, "games/defender_rewarded": 6,
                 "format/defender_violation_rate": 0.5, "games/defender_format_checked": 8,
                 "is/ratio_mean": 1.0, "policy/entropy": 2.0, "kl/mean": 0.1, "tokens/loss": 300,
                 "is/ratio_max": 1.2},
                {"step": 1, "reward/defender_mean": -1.0, "games/defender_rewarded": 2,
                 "format/defender_violation_rate": 0.0, "games/defender_format_checked": 2,
                 "is/ratio_mean": 2.0, "policy/entropy": 6.0, "kl/mean": 0.5, "tokens/loss": 100,
                 "is/ratio_max": 1.5}]
    monkeypatch.setattr(distributed, "_gather", lambda obj, ranks: per_rank)
    m = distributed.reduce_metrics(per_rank[0], distributed.Ranks(rank=0, world=2))
    assert m["reward/defender_mean"] == pytest.approx((6 * 1.0 + 2 * -1.0) / 8)
    assert m["format/defender_violation_rate"] == pytest.approx(4 / 10)
    assert m["is/ratio_mean"] == pytest.approx((300 * 1.0 + 100 * 2.0) / 400)
    assert m["policy/entropy"] == pytest.approx((300 * 2.0 + 100 * 6.0) / 400)
    assert m["kl/mean"] == pytest.approx((300 * 0.1 + 100 * 0.5) / 400)
    assert m["is/ratio_max"] == 1.5 and m["tokens/loss"] == 400 and m["games/defender_rewarded"] == 8


def test_each_rank_has_its_own_sft_stream_and_every_one_is_checkpointed():
    import fast_srt.run.trainer as trainer
    from fast_srt.learner.batch import Sample
    from fast_srt.learner.sft import SFTStream
    from fast_srt.run import checkpoint, distributed

    samples = [Sample([1, i], [2, i], "defender") for i in range(50)]
    assert trainer.sft_seed(7, 0) == 7  # one process: the run seed, as before
    s0, s1 = SFTStream(samples, trainer.sft_seed(7, 0)), SFTStream(samples, trainer.sft_seed(7, 1))
    first0, first1 = s0.next(5), s1.next(5)
    assert [s.prompt_ids for s in first0] != [s.prompt_ids for s in first1]  # the ranks draw different samples
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    learner = types.SimpleNamespace(sft_stream=s0, scaler=types.SimpleNamespace(is_enabled=lambda: False),
                                    logprob_fn=len, device=torch.device("cpu"))
    pool = types.SimpleNamespace(rng=__import__("random").Random(0))
    run = types.SimpleNamespace(pool=pool, warmup_key=None, learner=learner, ranks=distributed.Ranks(), league=None)
    extra = trainer.checkpoint_extra(run, {}, [s0.state_dict(), s1.state_dict()])
    assert len(extra["sft_streams"]) == 2
    state = {"format": checkpoint.FORMAT_VERSION, "optimizer": opt.state_dict(), "scheduler": None,
             "rng": checkpoint.rng_state(), "step": 4, "extra": extra}
    # rank 1 of 2 continues its own stream where it stopped
    fresh = SFTStream(samples, trainer.sft_seed(7, 1))
    step, _, replay = trainer.restore_run_state(state, opt, None, types.SimpleNamespace(rng=pool.rng), fresh,
                                                types.SimpleNamespace(is_enabled=lambda: False),
                                                distributed.Ranks(rank=1, world=2))
    assert step == 4 and replay == extra["replay"]
    assert [s.prompt_ids for s in fresh.next(5)] == [s.prompt_ids for s in s1.next(5)]


# ------------------------------------------------------------------------------------------------ replay conditions

def test_resume_under_other_conditions_says_it_is_not_an_exact_replay():
    import fast_srt.run.trainer as trainer

    saved = {"torch threads": 2, "torch": "2.13.0", "vllm": "0.32.0", "device": "cpu", "log-prob kernel": "twin",
             "ranks": 1}
    assert trainer.replay_warning(saved, dict(saved)) is None
    assert trainer.replay_warning(None, dict(saved)) is None  # a checkpoint from before replay conditions existed
    line = trainer.replay_warning(saved, {**saved, "torch threads": 4})
    assert "not an exact replay" in line and "torch threads 2 -> 4" in line and "\n" not in line


def test_sampling_rng_replays_a_batch_and_leaves_the_callers_random_state(tiny_engine):
    from fast_srt.engine.engine import SamplingSpec, derive_seed

    spec = SamplingSpec(max_tokens=8, temperature=1.0)
    prompts = [f"<|im_start|>user\nHello {i}<|im_end|>\n<|im_start|>assistant\n" for i in range(6)]
    seed = derive_seed(3, 2, 0, "defender")
    torch.manual_seed(11)
    before = torch.rand(3)
    torch.manual_seed(11)
    a = [g.token_ids for g in tiny_engine.generate(prompts, spec, rng_seed=seed)]
    assert torch.equal(torch.rand(3), before)  # the caller's stream is as if nothing had sampled
    b = [g.token_ids for g in tiny_engine.generate(prompts, spec, rng_seed=seed)]
    c = [g.token_ids for g in tiny_engine.generate(prompts, spec, rng_seed=derive_seed(3, 3, 0, "defender"))]
    assert a == b and a != c
    assert derive_seed(3, 2, 0, "defender") != derive_seed(3, 2, 1, "defender")  # each rank its own draws
