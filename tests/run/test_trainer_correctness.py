"""Trainer pieces that make a run do what the user asked: sampling temperature in every log-prob, the reference's
numerics, dense GRPO groups after drops, the scheduler floor, loss logging, fp16 scaling, the frozen defender and
the judge's own length, empty attacks, one BOS token, resume checks, SFT stream state, disk-full saves.

End-to-end counterparts (a real `fast-srt train` in a subprocess) are in test_train.py.
"""

import dataclasses
import errno
from types import SimpleNamespace

import pytest
import torch

from fast_srt.run import checkpoint as ck
from helpers import learner_run, random_samples, rollout
from fast_srt.learner.batch import pack
from fast_srt.config import AlgoConfig, GameConfig, ModelConfig, OptimConfig, TrainConfig
from fast_srt.errors import UserError
from fast_srt.kernels import logprobs_chunked
from fast_srt.learner.policy import build_optimizer, build_scheduler, load_policy, load_reference, token_logprobs
from fast_srt.learner.step import (compute_advantages, scheduler_step, update_policy)


# -------------------------------------------------------------------------------------- temperature and reference

def test_logprobs_follow_the_temperature(tiny_model_dir):
    model = load_policy(str(tiny_model_dir), dtype=torch.float32).eval()
    batch = pack(random_samples(model.config.vocab_size))
    with torch.no_grad():
        lp07, _ = token_logprobs(model, batch, logprobs_chunked, 0.7)
    # reference: the first sample alone through a plain HF forward, float64 log-softmax of logits / 0.7
    s = random_samples(model.config.vocab_size)[0]
    with torch.no_grad():
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        logits = model(ids).logits[0, len(s.prompt_ids) - 1:-1].double() / 0.7
    want = torch.log_softmax(logits, -1).gather(1, torch.tensor(s.response_ids)[:, None])[:, 0]
    got = batch.split_responses(lp07)[0]
    assert torch.allclose(got.double(), want, atol=1e-4)
    with torch.no_grad():
        lp1, _ = token_logprobs(model, batch, logprobs_chunked, 1.0)
    assert not torch.allclose(lp1, lp07)


def test_reference_computes_what_the_autocast_policy_computes(tiny_model_dir):
    """On identical weights the bf16 reference's log-probs equal the fp32-master policy's under bf16 autocast
    (KL exactly 0); the old all-bf16 reference did not."""
    policy = load_policy(str(tiny_model_dir), dtype=torch.float32).eval()
    ref = load_reference(str(tiny_model_dir), torch.bfloat16)
    batch = pack(random_samples(policy.config.vocab_size, n=5, seed=3))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, _ = token_logprobs(policy, batch, logprobs_chunked, 0.7)
        b, _ = token_logprobs(ref, batch, logprobs_chunked, 0.7)
        old_ref = load_policy(str(tiny_model_dir), dtype=torch.bfloat16).eval()
        c, _ = token_logprobs(old_ref, batch, logprobs_chunked, 0.7)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the defect this replaces
    lin = [m for m in ref.modules() if isinstance(m, torch.nn.Linear) and m is not ref.get_output_embeddings()]
    assert lin and all(m.weight.dtype == torch.bfloat16 for m in lin)
    assert ref.get_output_embeddings().weight.dtype == torch.float32


# -------------------------------------------------------------------------------------- advantages

def test_grpo_group_ids_with_gaps_are_renumbered():
    """Ties and empty turns leave gaps in the (seed, role) group ids; the kernels need ids in [0, S)."""
    from fast_srt.kernels import group_advantages_ref, reinforce_pp_advantages_ref

    cfg = TrainConfig(algo=AlgoConfig(estimator="grpo", samples_per_prompt=2), sampling=dataclasses.replace(
        TrainConfig().sampling, games_per_step=16))
    gapped = random_samples(50, n=6, group=lambda i: [0, 0, 5, 5, 13, 13][i])
    dense = random_samples(50, n=6, group=lambda i: i // 2)
    old = [torch.zeros(len(s.response_ids)) for s in gapped]
    fns = (reinforce_pp_advantages_ref, group_advantages_ref)
    got, _ = compute_advantages(cfg, gapped, old, None, fns, torch.device("cpu"))
    want, _ = compute_advantages(cfg, dense, old, None, fns, torch.device("cpu"))
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert any(g.abs().sum() > 0 for g in got)


def test_advantages_run_on_the_device_they_were_chosen_for():
    seen = []

    def spy(rewards, *args, **kw):
        seen.append(rewards.device)
        return torch.zeros(args[1].shape[0] if kw.get("kind") is None else args[2].shape[0])

    def reinforce(old, ref, rewards, cu, mask, roles, **kw):
        seen.extend([old.device, rewards.device, mask.device])
        return torch.zeros(mask.shape[0], device=mask.device), None

    samples = random_samples(50, n=4)
    compute_advantages(TrainConfig(), samples, [torch.zeros(len(s.response_ids)) for s in samples], None,
                       (reinforce, spy), torch.device("cpu"))
    assert seen and all(d == torch.device("cpu") for d in seen)


# -------------------------------------------------------------------------------------- update_policy

def test_logged_pg_loss_does_not_depend_on_micro_batching(tiny_model_dir):
    """loss/pg is the mini-batch's loss, not that divided by its micro-batch count."""
    vals = []
    for micro in (64, 100000):
        run = learner_run(tiny_model_dir, micro=micro)
        samples = random_samples(run.model.config.vocab_size, n=8, seed=1)
        old, advs = rollout(run, samples)
        out = update_policy(run, 1, samples, old, None, advs)
        vals.append(float(out["loss/pg"]))
    assert vals[0] == pytest.approx(vals[1], rel=1e-5, abs=1e-7), vals
    assert abs(vals[0]) > 1e-4


def test_lr_reaches_its_floor_at_the_last_update(tiny_model_dir):
    run = learner_run(tiny_model_dir, steps=3, ups=2, lr=1e-3)
    lrs = []
    for _ in range(3 * 2):
        lrs.append(run.optimizer.param_groups[0]["lr"])
        run.optimizer.step()
        scheduler_step(run)
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-3 * run.cfg.optim.min_lr_ratio)
    assert lrs == sorted(lrs, reverse=True)


def test_skipped_updates_still_move_the_schedule(tiny_model_dir):
    run = learner_run(tiny_model_dir, steps=3, ups=2, nan_step=1)
    samples = random_samples(run.model.config.vocab_size, n=4, seed=2)
    old, advs = rollout(run, samples)
    out = update_policy(run, 1, samples, old, None, advs)
    assert out["optim/skipped_updates"] == 2 and out["optim/updates"] == 0
    assert run.scheduler.last_epoch == 2


def test_grpo_kl_coef_adds_the_k3_term(tiny_model_dir):
    run = learner_run(tiny_model_dir, estimator="grpo", kl=0.5)
    samples = random_samples(run.model.config.vocab_size, n=4, seed=4)
    old, advs = rollout(run, samples)
    ref = [o - 0.3 for o in old]  # a reference that differs: k3 > 0
    out = update_policy(run, 1, samples, old, ref, advs)
    assert float(out["loss/kl_k3"]) > 0


def test_fp16_runs_through_a_gradient_scaler(tiny_model_dir):
    run = learner_run(tiny_model_dir, fp16_scaler=True)
    before = [p.detach().clone() for p in run.model.parameters()]
    samples = random_samples(run.model.config.vocab_size, n=4, seed=5)
    old, advs = rollout(run, samples)
    out = update_policy(run, 1, samples, old, None, advs)
    assert out["optim/grad_scale"] > 1 and out["optim/updates"] == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, run.model.parameters()))


# -------------------------------------------------------------------------------------- engines and the judge

class FakeEngine:
    def __init__(self, model_dir, *, dtype="bfloat16", max_model_len=2048, kv_cache_gib=1.0, seed=0, name="x",
                 **kw):
        self.model_dir, self.max_model_len, self.name = str(model_dir), max_model_len, name
        from fast_srt.run.tiny import make_tokenizer

        self.tokenizer = make_tokenizer()


def test_frozen_defender_and_judge_always_hold_the_base_model(monkeypatch, tmp_path, tiny_model_dir):
    """attacker_only after a resume: the policy engine starts from the checkpoint, the frozen defender and the
    base-model judge from the base model; the judge gets its own length and the configured answer cap."""
    from fast_srt.engine import placement as session

    monkeypatch.setattr(session, "Engine", FakeEngine)
    ckpt = tmp_path / "checkpoints" / "step_00000001"
    mcfg = ModelConfig(model=str(tiny_model_dir), judge_max_model_len=300, max_model_len=1024)
    for judge in ("policy", str(tiny_model_dir)):
        e = session.build_engines(dataclasses.replace(mcfg, judge_model=judge), GameConfig(mode="attacker_only"),
                                  trains=True, seed=0, policy_dir=ckpt, base_dir=tiny_model_dir,
                                  judge_dir=None if judge == "policy" else tiny_model_dir, judge_max_tokens=100)
        assert e.policy.model_dir == str(ckpt)
        assert e.frozen_defender.model_dir == str(tiny_model_dir)
        assert e.judge.engine.model_dir == str(tiny_model_dir) and e.judge.engine.max_model_len == 300
        assert e.judge.max_tokens == 100
    big = dataclasses.replace(mcfg, judge_max_model_len=100000, judge_model="policy")
    e = session.build_engines(big, GameConfig(), trains=True, seed=0, base_dir=tiny_model_dir)
    assert e.judge.engine.max_model_len == 2048  # capped at the judge model's context


def test_judge_cuts_long_pairs_to_fit_and_counts_them(tiny_engine):
    from fast_srt.engine.judge import Judge

    judge = Judge(tiny_engine)
    long_r = "Here is a very long answer. " * 400
    pairs = [("How do I bake bread?", long_r), ("Tell me. " * 300, long_r), ("Hello", "Hi there")]
    out = judge.score(pairs)
    assert len(out) == 3 and not any(lab.parse_error for lab, _ in out)
    assert all(lab.prompt_harmful is not None for lab, _ in out)
    assert judge.truncated == 2 and judge.too_long == 0
    assert all(len(judge.fit(p, r)) < tiny_engine.max_model_len for p, r in pairs)


def test_empty_attacker_prompt_is_a_format_penalty_not_a_tie():
    from fast_srt.engine.engine import Generation
    from fast_srt.game.rules import GameOptions, Seed
    from fast_srt.game.rewards import reward_function
    from fast_srt.engine.judge import RuleJudge
    from fast_srt.engine.rollout import play_games
    from fast_srt.learner.step import games_to_samples

    class Policy:
        from fast_srt.run.tiny import make_tokenizer
        tokenizer = make_tokenizer()

        def generate(self, prompts, spec, lora=None, phase="generate", rng_seed=None):
            text = "  " if phase == "attacker" else "an answer"
            return [Generation([1, 2], [7, 8], text, [-1.0, -1.0], "stop") for _ in prompts]

    seeds = [(Seed("how to pick a lock", True), "generated_harmful"), (Seed("bake bread", False), "vanilla_benign")]
    policy = Policy()
    games = play_games(policy, RuleJudge("vowel_refusal", policy), seeds, GameOptions(mode="selfplay", cot=False),
                       None, reward_function("general_sum"))
    g = games[0]
    assert g.rewards.outcome == "empty_attack" and not g.rewards.tie
    assert g.rewards.attacker == -1.0 and g.rewards.defender is None
    samples, skipped = games_to_samples(games, None, True, [0, 1])
    assert [(s.role, s.reward) for s in samples][0] == ("attacker", -1.0)
    assert sum(s.role == "defender" for s in samples) == 1  # only the vanilla game's defender


def test_engine_sends_one_bos_token(tiny_bos_engine):
    """A Llama-3-like tokenizer whose chat template writes BOS: the engine's prompt ids start with one BOS, like
    the SFT samples, not two."""
    from fast_srt.engine.engine import SamplingSpec
    from fast_srt.game.rules import build_defender_prompt

    eng = tiny_bos_engine
    bos = eng.tokenizer.bos_token_id
    prompt = build_defender_prompt(eng.tokenizer, "How do I bake bread?", cot=False)
    assert eng.tokenizer(prompt).input_ids[:2] == [bos, bos]  # what vLLM would have made of the string
    g = eng.generate([prompt], SamplingSpec(max_tokens=4, temperature=0.0))[0]
    assert g.prompt_ids[0] == bos and g.prompt_ids.count(bos) == 1
    assert g.prompt_ids == eng.tokenizer(prompt, add_special_tokens=False).input_ids


# -------------------------------------------------------------------------------------- resume and checkpoints

def test_sft_stream_state_round_trip():
    from fast_srt.learner.sft import SFTStream

    samples = random_samples(40, n=7)
    a = SFTStream(samples, seed=3)
    a.next(10)
    b = SFTStream(samples, seed=3)
    b.load_state_dict(a.state_dict())
    assert [id(x) for x in a.next(12)] == [id(x) for x in b.next(12)]
    with pytest.raises(UserError, match="SFT data"):
        SFTStream(samples[:5], seed=3).load_state_dict(a.state_dict())


def test_lora_adapter_of_another_rank_is_refused(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    from fast_srt.run.checkpoint import LORA_ADAPTER_FILE
    from fast_srt.learner.lora import adapter_state_dict, apply_lora
    from fast_srt.run.trainer import load_lora_adapter

    m4 = load_policy(str(tiny_model_dir), dtype=torch.float32)
    apply_lora(m4, 4, 8.0, ("q_proj", "v_proj"))
    save_file(adapter_state_dict(m4), str(tmp_path / LORA_ADAPTER_FILE))
    m8 = load_policy(str(tiny_model_dir), dtype=torch.float32)
    apply_lora(m8, 8, 8.0, ("q_proj", "v_proj"))
    with pytest.raises(UserError, match="does not match"):
        load_lora_adapter(m8, tmp_path)
    m4b = load_policy(str(tiny_model_dir), dtype=torch.float32)
    apply_lora(m4b, 4, 8.0, ("q_proj", "k_proj", "v_proj"))
    with pytest.raises(UserError, match="missing"):
        load_lora_adapter(m4b, tmp_path)
    m4c = load_policy(str(tiny_model_dir), dtype=torch.float32)
    apply_lora(m4c, 4, 8.0, ("q_proj", "v_proj"))
    load_lora_adapter(m4c, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(adapter_state_dict(m4c).values(), adapter_state_dict(m4).values()))


def test_resume_refuses_a_changed_config(tmp_path):
    from fast_srt.run.trainer import check_resume_config

    cfg = TrainConfig(steps=6)
    (tmp_path / ck.RUN_CONFIG_FILE).write_text(__import__("json").dumps(dataclasses.asdict(cfg), default=str))
    check_resume_config(tmp_path, dataclasses.replace(cfg, resume=True, save_every=1, log_games=9))
    with pytest.raises(UserError, match="--steps: checkpoint 6, now 10"):
        check_resume_config(tmp_path, dataclasses.replace(cfg, steps=10))
    with pytest.raises(UserError, match="--optim.lr"):
        check_resume_config(tmp_path, dataclasses.replace(cfg, optim=OptimConfig(lr=1.0)))


def _ckpt_objects(tiny_model_dir):
    model = load_policy(str(tiny_model_dir), dtype=torch.float32)
    opt = build_optimizer(model, 1e-3)
    return model, opt, build_scheduler(opt, 10)


def test_failed_checkpoint_write_is_one_clear_error_and_keeps_the_previous(tiny_model_dir, tmp_path,
                                                                           monkeypatch):
    model, opt, sched = _ckpt_objects(tiny_model_dir)
    ck.save_checkpoint(tmp_path, 1, model, None, opt, sched, {}, {})

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", disk_full)
    with pytest.raises(UserError) as e:
        ck.save_checkpoint(tmp_path, 2, model, None, opt, sched, {}, {})
    msg = str(e.value)
    assert "No space left on device" in msg and "step_00000001 is intact" in msg and "--resume" in msg
    assert ck.find_latest(tmp_path).name == "step_00000001"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # the partial write is cleaned up


def test_free_space_is_checked_before_the_first_step(tiny_model_dir, tmp_path, monkeypatch):
    model, _, _ = _ckpt_objects(tiny_model_dir)
    need = ck.checkpoint_bytes(model)
    n = sum(p.numel() for p in model.parameters())
    assert need >= 12 * n  # fp32 weights + two AdamW states
    ck.check_free_space(tmp_path / "new" / "run", need)  # a directory that does not exist yet
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: SimpleNamespace(free=need // 3, total=0, used=0))
    with pytest.raises(UserError, match="a checkpoint needs about .* GiB and its disk has .* GiB free"):
        ck.check_free_space(tmp_path, need)


def test_per_role_stability_metrics_pool_to_the_pooled_ones(tiny_model_dir):
    """Each role's KL, importance ratio, clip fraction, entropy and log-prob mismatch is a mean over that role's
    loss tokens: weighted by the roles' token counts they give the pooled mean, and the KL per role is what old -
    ref gives over that role's tokens (the first mini-batch's from its own forward, the rest from the old pass)."""
    from fast_srt.learner.step import ROLE_SPLIT, kl_sums, mini_batches, pop_kl_means, role_key

    run = learner_run(tiny_model_dir, micro=64, ups=2, lr=3e-2, estimator="grpo", kl=0.5)
    samples = random_samples(run.model.config.vocab_size, n=10, seed=7, group=lambda i: i // 2)
    old, advs = rollout(run, samples)
    g = torch.Generator().manual_seed(3)
    for s, o in zip(samples, old):  # the sampler's log-probs differ from the trainer's: IS ratios away from 1
        s.vllm_logprobs = (o + 0.3 * torch.randn(len(o), generator=g)).tolist()
    ref = [o - 0.4 * torch.rand(len(o), generator=g) for o in old]
    minis = mini_batches(run.cfg, 1, len(samples))
    given = [None if i in minis[0] else o for i, o in enumerate(old)]
    out = update_policy(run, 1, samples, given, ref, advs, minis)
    out.update(kl_sums(samples, given, ref))
    out.update(pop_kl_means(out))
    n = {r: sum(len(s.response_ids) for s in samples if s.role == r) for r in ("attacker", "defender")}
    assert min(n.values()) > 0 and out["optim/updates"] == 2
    for k in ROLE_SPLIT:
        per_role = {r: float(out[role_key(k, r)]) for r in n}
        pooled = sum(per_role[r] * n[r] for r in n) / sum(n.values())
        assert pooled == pytest.approx(float(out[k]), rel=1e-5, abs=1e-6), (k, per_role, float(out[k]))
    assert float(out["loss/clip_frac"]) > 0 and float(out["is/logp_mismatch_mean_abs"]) > 0.1
    assert out["loss/attacker_clip_frac"] != out["loss/defender_clip_frac"]
    for r in n:  # against old - ref computed directly
        want = sum(float((o - rf).sum()) for s, o, rf in zip(samples, old, ref) if s.role == r) / n[r]
        assert out[role_key("kl/mean", r)] == pytest.approx(want, rel=1e-5)


def test_a_role_without_samples_has_no_per_role_metrics(tiny_model_dir):
    """defender_only: no attacker token, so the attacker's means are None (a gap), not 0."""
    from fast_srt.learner.step import ROLE_SPLIT, kl_sums, pop_kl_means, role_key

    run = learner_run(tiny_model_dir)
    samples = [s for s in random_samples(run.model.config.vocab_size, n=8, seed=8) if s.role == "defender"]
    old, advs = rollout(run, samples)
    out = update_policy(run, 1, samples, old, None, advs)
    out.update(pop_kl_means({**out, **kl_sums(samples, old, None)}))
    assert all(out.get(role_key(k, "attacker")) is None for k in ROLE_SPLIT)
    assert all(out[role_key(k, "defender")] is not None for k in ROLE_SPLIT)
