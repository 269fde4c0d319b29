"""The learner, torch only: packed batches (batch), the policy forward and log-probs (policy), losses (loss),
LoRA (lora), auxiliary SFT data (sft), and the learner's half of a training step (step)."""
