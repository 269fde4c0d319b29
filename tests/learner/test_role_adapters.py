"""Per-role adapters (`--roles per-role`): one LoRA adapter per role over one frozen base. Each role's forward uses
its own adapter, the reference is the base with every adapter off, and one update over both roles' samples moves
each adapter by its own role's samples only."""

import torch

from fast_srt.learner.batch import ROLE_IDS
from fast_srt.learner.lora import (active_adapter, adapter_state_dict, adapters_disabled, apply_lora,
                                   load_role_adapter, lora_roles, merged_state_dict)
from fast_srt.learner.policy import build_optimizer, load_policy
from fast_srt.learner.step import micro_batches, update_policy
from helpers import learner_run, random_samples, rollout

ROLES = tuple(ROLE_IDS)
TARGETS = ("q_proj", "v_proj", "down_proj")


def _per_role(model):
    apply_lora(model, rank=4, alpha=8.0, targets=TARGETS, roles=ROLES)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B_" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(hash(name) % 1000))
    return model


def _adapter(model, role):
    return {k: v.clone() for k, v in adapter_state_dict(model, role).items()}


def test_each_role_forwards_with_its_own_adapter(tiny_model_dir):
    model = _per_role(load_policy(str(tiny_model_dir), dtype=torch.float32))
    shared = load_policy(str(tiny_model_dir), dtype=torch.float32)
    apply_lora(shared, rank=4, alpha=8.0, targets=TARGETS)
    assert lora_roles(model) == ROLES and lora_roles(shared) == ()
    # a role's adapter has a shared run's names; the shared adapter's names are as they were
    assert set(adapter_state_dict(model, "attacker")) == set(adapter_state_dict(shared))
    assert all(k.endswith((".lora_A", ".lora_B")) for k in adapter_state_dict(shared))
    ids = torch.randint(3, model.config.vocab_size, (1, 19))
    with torch.no_grad():
        out = {}
        for role in ROLES:
            with active_adapter(model, role):
                out[role] = model(ids).logits
        default = model(ids).logits  # the defender's, outside any scope
        with adapters_disabled(model):
            off = model(ids).logits
        base = load_policy(str(tiny_model_dir), dtype=torch.float32)(ids).logits
        merged = load_policy(str(tiny_model_dir), dtype=torch.float32)
        merged.load_state_dict(merged_state_dict(model, "attacker"), strict=False)
        merged_att = merged(ids).logits
    assert not torch.allclose(out["attacker"], out["defender"], atol=1e-3)
    assert torch.equal(default, out["defender"])
    assert torch.allclose(off, base, atol=1e-6)  # the KL reference: every adapter off
    assert torch.allclose(merged_att, out["attacker"], atol=1e-4)
    # writing one role's adapter changes that role's forward only
    before = _adapter(model, "defender")
    load_role_adapter(model, {k: v * 2 for k, v in _adapter(model, "attacker").items()}, "attacker")
    with torch.no_grad(), active_adapter(model, "defender"):
        assert torch.equal(model(ids).logits, out["defender"])
    assert all(torch.equal(v, before[k]) for k, v in adapter_state_dict(model, "defender").items())


def test_micro_batches_by_role_hold_one_role_each(tiny_model_dir):
    samples = random_samples(300, n=12)
    for share in (False, True):
        mbs = micro_batches(samples, 60, share, by_role=True)
        assert all(len({s.role for s in mb}) == 1 for mb in mbs)
        assert sorted(id(s) for mb in mbs for s in mb) == sorted(id(s) for s in samples)


def _learner(tiny_model_dir):
    run = learner_run(tiny_model_dir, ups=1, lr=1e-2)
    _per_role(run.model)
    run.optimizer = build_optimizer(run.model, 1e-2)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda _: 1.0)
    return run


def test_one_update_moves_each_adapter_by_its_own_roles_samples_only(tiny_model_dir):
    """Both roles' samples in one mini-batch, one optimizer step: with the defender samples' advantages zeroed the
    defender adapter does not move (and the attacker's does), and the other way round."""
    for still in ROLES:
        run = _learner(tiny_model_dir)
        samples = random_samples(run.model.config.vocab_size, n=8)
        assert {s.role for s in samples} == set(ROLES)
        old, advs = rollout(run, samples)
        advs = [torch.zeros_like(a) if s.role == still else a for s, a in zip(samples, advs)]
        before = {r: _adapter(run.model, r) for r in ROLES}
        out = update_policy(run, 1, samples, old, None, advs, [list(range(len(samples)))])
        assert out["optim/updates"] == 1
        for role in ROLES:
            after = adapter_state_dict(run.model, role)
            same = all(torch.equal(after[k], v) for k, v in before[role].items())
            assert same == (role == still), (still, role)


def test_checkpoint_holds_both_adapters_and_refuses_the_other_kind(tiny_model_dir, tmp_path):
    """A per-role checkpoint: the defender's merged model and role_adapters/{attacker,defender}.safetensors; both
    load back exactly, and neither kind of checkpoint loads into a run of the other kind."""
    import pytest
    from safetensors.torch import load_file

    from fast_srt.errors import UserError
    from fast_srt.run.checkpoint import LORA_ADAPTER_FILE, ROLE_ADAPTER_DIR, save_checkpoint
    from fast_srt.run.trainer import load_lora_adapter

    def fresh(roles=ROLES):
        m = load_policy(str(tiny_model_dir), dtype=torch.float32)
        apply_lora(m, rank=4, alpha=8.0, targets=TARGETS, roles=roles)
        return m

    model = _per_role(load_policy(str(tiny_model_dir), dtype=torch.float32))
    opt = build_optimizer(model, 1e-3)
    ckpt = save_checkpoint(tmp_path / "per_role", 1, model, None, opt, None, {}, {})
    assert sorted(p.name for p in (ckpt / ROLE_ADAPTER_DIR).iterdir()) == ["attacker.safetensors",
                                                                         "defender.safetensors"]
    assert not (ckpt / LORA_ADAPTER_FILE).exists()
    merged = load_file(str(ckpt / "model.safetensors"))
    want = merged_state_dict(model, "defender")
    assert all(torch.equal(merged[k], want[k].to(merged[k].dtype)) for k in merged)
    back = fresh()
    load_lora_adapter(back, ckpt)
    for role in ROLES:
        got, exp = adapter_state_dict(back, role), adapter_state_dict(model, role)
        assert all(torch.equal(got[k], exp[k]) for k in exp)
    with pytest.raises(UserError, match="holds one LoRA adapter per role"):
        load_lora_adapter(fresh(()), ckpt)
    shared = fresh(())
    shared_ckpt = save_checkpoint(tmp_path / "shared", 1, shared, None, build_optimizer(shared, 1e-3), None, {}, {})
    assert (shared_ckpt / LORA_ADAPTER_FILE).is_file() and not (shared_ckpt / ROLE_ADAPTER_DIR).exists()
    with pytest.raises(UserError, match="holds one shared LoRA adapter, not one per role"):
        load_lora_adapter(fresh(), shared_ckpt)
