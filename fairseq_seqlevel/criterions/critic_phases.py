"""The two training phases of a criterion with a critic (``erac``, ``vaml``).

Phase 1 trains the critic with the actor frozen; phase 2 uses the trained
critic.  The phase, and the count of phase-1 batches, are buffers of the
criterion, so they travel in the checkpoint's ``criterion`` state: phase 2
refuses to start from a checkpoint without a trained critic, phase 1 refuses
to follow phase 2.  Design: docs/concepts.md, "Critic phases".
"""

from typing import NamedTuple

import torch

from fairseq_seqlevel.errors import ConfigError


class Phases(NamedTuple):
    """A criterion's phase flag, its two values and the buffer counting critic batches."""
    flag: str  # e.g. "--erac-phase"
    critic: str  # phase 1: train the critic (e.g. "critic", "q")
    uses_critic: str  # phase 2: train the actor from the critic (e.g. "joint", "actor")
    counter: str  # buffer name of the phase-1 batch count (e.g. "critic_batches")
    refused: str  # what the refused order of phases is called in its error


class CriticPhases:
    """Mixin of a :class:`~fairseq_seqlevel.criterions.base.SeqlevelCriterion`
    with a critic: ``self.phases`` (:class:`Phases`) and ``self.want_phase``
    (the configured phase name) set, :meth:`init_phases` called in ``__init__``;
    :meth:`on_phase_start` runs once, at the first training forward (after any
    checkpoint load)."""

    def init_phases(self):
        self.register_buffer("phase_code", torch.tensor(0))
        self.register_buffer(self.phases.counter, torch.tensor(0))
        self._started = False

    def _code(self, name):
        return 1 if name == self.phases.critic else 2

    @property
    def critic_batches_seen(self) -> int:
        return int(getattr(self, self.phases.counter))

    def count_critic_batch(self):
        getattr(self, self.phases.counter).add_(1)

    def in_critic_phase(self, model) -> bool:
        """True in phase 1; starts the phase on the first call (checks, :meth:`on_phase_start`)."""
        if not self._started:
            self._start_phase(model)
        return int(self.phase_code) == 1

    def _start_phase(self, model):
        p, want = self.phases, self._code(str(self.want_phase))
        self._started = True
        if want == 2 and self.critic_batches_seen == 0:
            raise ConfigError(f"{p.flag} {p.uses_critic} needs a trained critic: train with {p.flag} {p.critic} "
                              f"first, then start {p.uses_critic} from that checkpoint (--restore-file CKPT "
                              "--reset-optimizer)")
        if want == 1 and int(self.phase_code) == 2:
            raise ConfigError(f"{p.flag} {p.critic} after {p.refused} is refused: the critic is trained first; "
                              "restart it from the MLE checkpoint (--finetune-from-model)")
        self.on_phase_start(model, entering=int(self.phase_code) != want, phase=want)
        self.phase_code.fill_(want)

    def on_phase_start(self, model, entering: bool, phase: int):
        """Hook: ``phase`` (1 or 2) starts; ``entering``: it was not the checkpoint's phase."""
