"""next_token_gains: ΔR over the whole vocabulary equals one reward call per token."""

import pytest
import torch

from fairseq_seqlevel import rewards
from fairseq_seqlevel.rewards.increments import next_token_gains

PAD, EOS, V = 1, 2, 23


def _reward(name):
    reward = rewards.get_reward(name)
    return lambda hyp, refs: reward(hyp, refs, PAD, eos=EOS)


def _brute_force(reward, prefix, refs):
    """ΔR by appending every token of the vocabulary, one at a time."""
    out = torch.empty(prefix.size(0), V)
    for b in range(prefix.size(0)):
        p = prefix[b][prefix[b].ne(PAD)]
        base = reward(torch.cat([p, torch.tensor([PAD])]).unsqueeze(0), refs[b:b + 1])
        for w in range(V):
            hyp = torch.cat([p, torch.tensor([w])]).unsqueeze(0)
            out[b, w] = (reward(hyp, refs[b:b + 1]).double() - base.double()).float()
    return out


def _data(num_refs, seed=0, batch=5):
    g = torch.Generator().manual_seed(seed)
    refs = torch.full((batch, num_refs, 8), PAD)
    for b in range(batch):
        for r in range(num_refs):
            n = int(torch.randint(1, 7, (1,), generator=g))
            refs[b, r, :n] = torch.randint(4, 12, (n,), generator=g)  # repeated tokens: clipping matters
            refs[b, r, n] = EOS
    refs[-1, 1:] = PAD  # an absent second reference
    prefix = torch.full((batch, 6), PAD)
    for b in range(batch):
        n = int(torch.randint(0, 7, (1,), generator=g))  # includes the empty prefix
        prefix[b, :n] = torch.randint(4, 14, (n,), generator=g)
    return prefix, refs


@pytest.mark.parametrize("name", ["bleu", "bleu_add1", "edit", "hamming"])
@pytest.mark.parametrize("num_refs", [1, 2])
def test_gains_equal_one_reward_call_per_token(name, num_refs):
    prefix, refs = _data(num_refs, seed=num_refs)
    reward = _reward(name)
    got = next_token_gains(reward, prefix, refs, PAD, V)
    expected = _brute_force(reward, prefix, refs)
    keep = torch.arange(V) != PAD  # appending pad is no token (the pad column holds the no-match value)
    torch.testing.assert_close(got[:, keep], expected[:, keep], rtol=0, atol=1e-6)
    # the test has reward-changing tokens: not every entry equals the no-match value
    assert (got != got[:, -1:]).any()
