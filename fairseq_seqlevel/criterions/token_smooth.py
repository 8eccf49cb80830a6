"""``token_smooth``: token-level loss smoothing (Elbayad et al. 2018, §3.3).

Each gold token y*_t gets the target r(y|y*_t) ∝ exp(s(y, y*_t)/τ) (eq. 13),
with s the cosine similarity of token embeddings, optionally minus
β·min(f(y)/f(y*), f(y*)/f(y)) to promote rare tokens (eq. 14).  The loss is
α·CE(r, p_θ) + (1-α)·NLL(y*) per token (eq. 16; CE and KL differ by the
entropy of r, which has no gradient — we log the CE, like fairseq's label
smoothing does).  Only the top-k neighbours of each token are kept
(``--token-smooth-topk``); every other token has probability exactly 0 under
r, and special symbols keep a one-hot target.  The same loss is what ``raml``
applies to the reference and its samples for Tok-Seq (eq. 17).
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
