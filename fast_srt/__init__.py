"""fast_srt: single-process self-play RL for language-model safety (Self-RedTeam).

Importing this package has no side effects: no model loads, no environment changes.
"""

__version__ = "0.1.0"
