"""The stages of a run, each a function of what it needs that returns what it made: ``build`` (model, processor,
data, reward setup), ``resume`` (a run's checkpoint to continue from), ``cold_start`` (Cold-Start SFT), ``grpo`` (the
loop around ``emor3.grpo.step.grpo_step``); evaluation is ``emor3.evaluate``'s. The entry points call them in order."""
