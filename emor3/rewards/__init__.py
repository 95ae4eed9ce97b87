"""EMO-R3 rewards: SET prompt and parser, format and accuracy rules, RER (reflection), combination into a total."""

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
    rollout_images,
    score_coherence_reply,
    score_consistency_reply,
)
from emor3.rewards.rules import accuracy_reward, extract_answer, format_reward, normalize_answer
from emor3.rewards.set_prompt import (
    DEFAULT_TEMPLATE,
    SET_INSTRUCTION,
    SetParse,
    build_set_messages,
    last_boxed,
    load_template,
    parse_set,
    set_prompt,
)

__all__ = [
    "WEIGHT_PRESETS",
    "JudgeRequest",
    "ModelJudge",
    "ReflectionResult",
    "reflect",
    "rollout_images",
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
