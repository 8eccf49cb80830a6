"""A language-pair dataset that also carries extra references of each target.

The batches keep fairseq's layout (``net_input``, ``target``, ``id``, ...) and
add ``references``: LongTensor B x R x T', right-padded, where reference 0 is
the primary target (with its eos, as in ``target``) and references 1..R-1 are
the extra ones in the order given by ``--extra-references``.  An example with
fewer references than R has all-pad rows, which the rewards ignore.
"""

import torch
from fairseq.data import BaseWrapperDataset


def pad_references(references, pad):
    """Stack a list (B) of lists (R_b) of 1-D LongTensors into B x R x T'."""
    num_refs = max(len(refs) for refs in references)
    max_len = max(ref.numel() for refs in references for ref in refs)
    out = torch.full((len(references), num_refs, max_len), pad, dtype=torch.long)
    for b, refs in enumerate(references):  # collation, outside the training step
        for r, ref in enumerate(refs):
            out[b, r, : ref.numel()] = ref
    return out


class MultiReferenceDataset(BaseWrapperDataset):
    """Wraps a LanguagePairDataset; ``extra_refs`` are datasets of target ids."""

    def __init__(self, dataset, extra_refs, pad):
        super().__init__(dataset)
        for name, refs in extra_refs.items():
            if len(refs) != len(dataset):
                from fairseq_seqlevel.errors import ConfigError

                raise ConfigError(
                    f"--extra-references: '{name}' has {len(refs)} sentences but the "
                    f"split has {len(dataset)}"
                )
        self.extra_refs = list(extra_refs.values())
        self.pad = pad

    def __getitem__(self, index):
        item = self.dataset[index]
        item["extra_refs"] = [refs[index] for refs in self.extra_refs]
        return item

    def collater(self, samples):
        batch = self.dataset.collater(samples)
        if len(batch) == 0 or "target" not in batch or batch["target"] is None:
            return batch
        by_id = {s["id"]: s for s in samples}
        ordered = [by_id[int(i)] for i in batch["id"]]
        batch["references"] = pad_references(
            [[s["target"], *s["extra_refs"]] for s in ordered], self.pad
        )
        return batch
