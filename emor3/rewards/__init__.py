"""EMO-R3 rewards: SET parser, format and accuracy rules, RER (reflection), combination into a total.

The SET prompt itself is built by ``emor3.engine.prompts`` (one layer down) and re-exported here with its parser."""

from emor3.rewards.combine import (
    WEIGHT_PRESETS,
    RewardBreakdown,
    RewardPlugin,
    combine,
    compute_rewards,
    load_reward_plugin,
    resolve_weights,
)
from emor3.rewards.reflection import (
    JudgeRequest,
    ModelJudge,
    ReflectionResult,
    reflect,
    score_coherence_reply,
    score_consistency_reply,
)
from emor3.rewards.rules import accuracy_reward, extract_answer, format_reward, normalize_answer
from emor3.engine.prompts import DEFAULT_TEMPLATE, SET_INSTRUCTION, build_set_messages, load_template, set_prompt
from emor3.rewards.set_parse import SetParse, last_boxed, parse_set

__all__ = [
    "WEIGHT_PRESETS",
    "JudgeRequest",
    "ModelJudge",
    "ReflectionResult",
    "reflect",
    "score_coherence_reply",
    "score_consistency_reply",
    "RewardBreakdown",
    "RewardPlugin",
    "combine",
    "compute_rewards",
    "load_reward_plugin",
    "resolve_weights",
    "DEFAULT_TEMPLATE",
    "SET_INSTRUCTION",
    "SetParse",
    "accuracy_reward",
    "build_set_messages",
    "extract_answer",
    "format_reward",
    "last_boxed",
    "load_template",
    "normalize_answer",
    "parse_set",
    "set_prompt",
]
