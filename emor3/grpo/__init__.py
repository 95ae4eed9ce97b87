"""GRPO: the objective math (objective), the rollout phase (rollout), one step (step) and the run (train:
python -m emor3.grpo.train)."""
