"""A training run: the trainer loop and its one step (trainer), checkpoints (checkpoint), metrics and the console
(metrics), model resolution (models), reports (report), tiny test models (tiny)."""
