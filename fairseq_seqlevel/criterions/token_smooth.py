"""``token_smooth``: token-level loss smoothing (Elbayad et al. 2018, §3.3):
each gold token's target is r(y|y*_t) ∝ exp(s(y, y*_t)/τ) over its top-k
embedding neighbours (eq. 13-14), mixed with the one-hot token (eq. 16).
Details: docs/criterions/token_smooth.md.
"""

from fairseq.criterions import register_criterion

from fairseq_seqlevel.criterions.base import SeqlevelCriterion
from fairseq_seqlevel.smoothing.config import TokenSmoothConfig
from fairseq_seqlevel.smoothing.losses import build_token_targets, check_token_smooth_config, smoothed_sequence_loss


@register_criterion("token_smooth", dataclass=TokenSmoothConfig)
class TokenSmoothCriterion(SeqlevelCriterion):
    def __init__(self, task, cfg: TokenSmoothConfig):
        check_token_smooth_config(cfg)
        super().__init__(task, cfg)
        self.token_targets = build_token_targets(cfg, task.target_dictionary)

    def training_loss(self, model, sample):
        net_output = model(**sample["net_input"])
        lprobs = model.get_normalized_probs(net_output, log_probs=True)
        target = model.get_targets(sample, net_output)
        loss, nll = smoothed_sequence_loss(lprobs, target, self.padding_idx, self.token_targets,
                                           self.cfg.token_smooth_alpha, self.cfg.token_smooth_temperature)
        loss, nll = loss.sum(), nll.sum()
        sample_size = self.sample_size_of(sample)
        return loss, sample_size, self.stock_logging_output(loss, nll, sample, sample_size)
