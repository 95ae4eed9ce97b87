"""emor3: GRPO with Structured Emotional Thinking and Reflective Emotional Rewards (EMO-R3) in pure PyTorch."""

__version__ = "0.1.0"
