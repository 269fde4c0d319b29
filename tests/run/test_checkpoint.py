"""Checkpoints: exact round trip, atomicity (interrupted saves are ignored), different-model and missing errors."""

import json
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fast_srt.run import checkpoint as ck
from fast_srt.errors import UserError
from fast_srt.learner.policy import (build_optimizer, build_scheduler, load_policy, pick_attention,
                                     prepare_for_training)

VOCAB = 300


def tiny_model(tie=True, vocab=VOCAB, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      attn_implementation=pick_attention("cpu"))
    return prepare_for_training(LlamaForCausalLM(cfg))


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(20)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def train_steps(model, opt, sched, n=2):
    for _ in range(n):
        x = torch.randint(0, VOCAB, (2, 8))
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def setup(tie=True):
    model = tiny_model(tie)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.01)
    sched = build_scheduler(opt, total_steps=10, warmup_steps=1)
    train_steps(model, opt, sched)
    return model, opt, sched


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_is_exact(tmp_path, tie):
    from transformers import AutoTokenizer

    model, opt, sched = setup(tie)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = ck.save_checkpoint(tmp_path, 7, model, tiny_tokenizer(), opt, sched, {"metrics_offset": 123},
                              {"lr": 1e-3, "preset": "tiny"})
    expected_draws = (random.random(), np.random.rand(), torch.rand(3))
    assert path == tmp_path / "checkpoints" / "step_00000007"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000007"
    assert json.loads((path / "fast_srt_config.json").read_text())["preset"] == "tiny"
    saved_cfg = json.loads((path / "config.json").read_text())
    assert saved_cfg["use_cache"] is True and "fast_srt" not in json.dumps(saved_cfg)

    ckpt_dir, state = ck.load_checkpoint(tmp_path, model=model)
    assert ckpt_dir == path and state["step"] == 7
    loaded = load_policy(str(ckpt_dir), dtype=torch.float32, device="cpu")
    assert loaded.config._attn_implementation == pick_attention("cpu") and loaded.training
    assert AutoTokenizer.from_pretrained(ckpt_dir).convert_tokens_to_ids("w3") == 6
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    opt2 = build_optimizer(loaded, lr=1e-3, weight_decay=0.01)
    sched2 = build_scheduler(opt2, total_steps=10, warmup_steps=1)
    extra = ck.restore_trainer_state(state, opt2, sched2)
    assert extra == {"metrics_offset": 123}
    # RNG streams continue exactly where they were at save time
    assert random.random() == expected_draws[0] and np.random.rand() == expected_draws[1]
    assert torch.equal(torch.rand(3), expected_draws[2])
    assert sched2.get_last_lr() == sched.get_last_lr()
    # the next optimizer step is bit-identical in both copies (moments and step counts were restored)
    torch.manual_seed(5)
    train_steps(model, opt, sched, 1)
    torch.manual_seed(5)
    train_steps(loaded, opt2, sched2, 1)
    for p1, p2 in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(p1, p2)


def test_keep_last_and_latest_pointer(tmp_path):
    model, opt, sched = setup()
    for step in (1, 2, 3, 4):
        ck.save_checkpoint(tmp_path, step, model, None, opt, sched, {}, {}, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_00000003", "step_00000004"]
    ck.save_checkpoint(tmp_path, 4, model, None, opt, sched, {"again": True}, {}, keep_last=2)  # re-save a step
    assert ck.load_checkpoint(tmp_path)[1]["extra"] == {"again": True}


def test_interrupted_save_is_ignored(tmp_path, monkeypatch):
    model, opt, sched = setup()
    ck.save_checkpoint(tmp_path, 1, model, None, opt, sched, {"n": 1}, {})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing trainer_state.pt")

    monkeypatch.setattr(ck.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 2, model, None, opt, sched, {"n": 2}, {})
    monkeypatch.undo()
    assert any(p.name.startswith(".tmp-step_00000002") for p in (tmp_path / "checkpoints").iterdir())
    with pytest.warns(RuntimeWarning, match="partial checkpoint"):
        ckpt_dir, state = ck.load_checkpoint(tmp_path)
    assert ckpt_dir.name == "step_00000001" and state["extra"] == {"n": 1}
    ck.save_checkpoint(tmp_path, 2, model, None, opt, sched, {"n": 2}, {})  # next save clears the leftover
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())


def test_incomplete_and_corrupted_fall_back_to_previous(tmp_path):
    model, opt, sched = setup()
    for step in (1, 2, 3):
        ck.save_checkpoint(tmp_path, step, model, None, opt, sched, {"n": step}, {}, keep_last=3)
    root = tmp_path / "checkpoints"
    (root / "step_00000003" / "COMPLETE").unlink()  # e.g. copied by hand, half-way
    state_file = root / "step_00000002" / "trainer_state.pt"
    state_file.write_bytes(state_file.read_bytes()[:100])  # truncated
    with pytest.warns(RuntimeWarning) as record:
        ckpt_dir, state = ck.load_checkpoint(tmp_path)
    assert ckpt_dir.name == "step_00000001" and state["extra"] == {"n": 1}
    messages = " ".join(str(w.message) for w in record)
    assert "step_00000003: COMPLETE is missing" in messages and "corrupted checkpoint" in messages


def test_sigkill_during_save_keeps_previous(tmp_path):
    """A real SIGKILL in the middle of writing step 2: step 1 stays the loadable checkpoint."""
    # The child uses a stand-in model (save_pretrained writes config.json + safetensors) so that it needs no
    # transformers import: the test is about the file protocol, not the model.
    script = textwrap.dedent(f"""
        import json, os, signal, sys, torch
        from safetensors.torch import save_file
        from fast_srt.run import checkpoint as ck

        class Config:
            use_cache = False

        class StandIn(torch.nn.Linear):
            config = Config()
            def save_pretrained(self, out):
                os.makedirs(out, exist_ok=True)
                save_file({{"weight": self.weight.detach().contiguous()}}, os.path.join(out, "model.safetensors"))
                with open(os.path.join(out, "config.json"), "w") as f:
                    json.dump({{"architectures": ["StandIn"]}}, f)

        model = StandIn(4, 4)
        opt = torch.optim.AdamW(model.parameters())
        ck.save_checkpoint({str(tmp_path)!r}, 1, model, None, opt, None, {{"n": 1}}, {{}})
        real_save = torch.save
        def save_then_die(obj, f, *a, **k):  # the kill lands exactly here: state written, COMPLETE not
            real_save(obj, f, *a, **k)
            print("MIDWAY", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        ck.torch.save = save_then_die
        ck.save_checkpoint({str(tmp_path)!r}, 2, model, None, opt, None, {{"n": 2}}, {{}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "MIDWAY", (proc.stdout, proc.stderr[-2000:])
    assert proc.returncode == -signal.SIGKILL
    with pytest.warns(RuntimeWarning, match="partial checkpoint"):
        ckpt_dir, state = ck.load_checkpoint(tmp_path)
    assert ckpt_dir.name == "step_00000001" and state["extra"] == {"n": 1}


def test_different_model_is_a_user_error(tmp_path):
    model, opt, sched = setup()
    ck.save_checkpoint(tmp_path, 1, model, None, opt, sched, {}, {})
    other = tiny_model(vocab=320)
    with pytest.raises(UserError, match=r"different model \(vocab_size: checkpoint 300 vs current model 320\)"):
        ck.load_checkpoint(tmp_path, model=other)
    ck.load_checkpoint(tmp_path, model=tiny_model(seed=1))  # other weights, same architecture: fine
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    with pytest.raises(UserError, match=r"model_type: checkpoint 'llama' vs current model 'qwen2'.*Qwen2ForCausalLM"):
        ck.load_checkpoint(tmp_path, model=qwen)


def test_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ck.load_checkpoint(tmp_path / "nope")
    with pytest.raises(UserError, match="no complete checkpoint"):
        ck.load_checkpoint(tmp_path)
    assert ck.find_latest(tmp_path) is None


def test_a_frozen_defender_from_a_checkpoint_reads_its_model_files_alone(tmp_path):
    """--game.frozen-defender: attacker_only only; a directory that is no model is one UserError; a checkpoint is
    read through a view of its model files (no adapter, trainer state or marker for the engine to load)."""
    import dataclasses

    from fast_srt.config import GameConfig, TrainConfig
    from fast_srt.errors import UserError
    from fast_srt.run.trainer import frozen_defender_dir

    with pytest.raises(UserError, match="pass --game.mode attacker_only"):
        TrainConfig(game=GameConfig(frozen_defender=str(tmp_path)))
    cfg = TrainConfig(game=GameConfig(mode="attacker_only", frozen_defender=str(tmp_path / "ckpt")))
    assert frozen_defender_dir(dataclasses.replace(cfg, game=GameConfig(mode="attacker_only")), tmp_path / "base",
                               tmp_path / "run") == tmp_path / "base"
    with pytest.raises(UserError, match="is not a model directory"):
        frozen_defender_dir(cfg, tmp_path / "base", tmp_path / "run")
    ckpt = tmp_path / "ckpt"
    (ckpt / "role_adapters").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "COMPLETE", "trainer_state.pt",
                 "lora_adapter.safetensors", "fast_srt_config.json", "role_adapters/attacker.safetensors"):
        (ckpt / name).write_text(name)
    for _ in range(2):  # a resume replaces the view
        view = frozen_defender_dir(cfg, tmp_path / "base", tmp_path / "run")
        assert view == tmp_path / "run" / "frozen_defender"
        assert sorted(p.name for p in view.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
        assert (view / "model.safetensors").read_text() == "model.safetensors"
    model_dir = tmp_path / "plain"
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model_dir / name).write_text(name)
    plain = dataclasses.replace(cfg, game=GameConfig(mode="attacker_only", frozen_defender=str(model_dir)))
    assert frozen_defender_dir(plain, tmp_path / "base", tmp_path / "run") == model_dir
