"""GRPO: the objective math, the rollout sampler and the train loop (python -m emor3.grpo.train)."""
