"""The reference-reading critic of erac / vaml (dai2018) and its targets and losses."""

from fairseq_seqlevel.critics.network import ReferenceCritic, blend_shadow, register_shadow, shadow  # noqa: F401
from fairseq_seqlevel.critics.objectives import (  # noqa: F401
    actor_objective, continuation_returns, continuation_rows, critic_loss, credit_forced, erac_td_targets,
    length_scaled_rewards, policy_stats, reference_lengths, soft_q_targets, soft_values, step_rewards, taken)
