"""The game, pure: roles, data types, prompts and the hidden-CoT format (rules), the judge protocol (judge), the
reward table (rewards), seed sets (seeds). Imports no torch, vLLM or transformers: verl or OpenRLHF code can
use it."""
