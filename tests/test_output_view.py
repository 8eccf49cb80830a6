"""The task's output view: rewards score what a user of the task would see."""

import torch

from fairseq_seqlevel.rewards.binding import BoundReward
from fairseq_seqlevel.rewards.output_view import OutputView, ViewedReward
from fairseq_seqlevel.rewards.registry import get_reward

PAD, EOS, LANG1, LANG2, END = 1, 2, 20, 21, 30


def _rows(seqs, width=None):
    width = width or max(len(s) for s in seqs)
    return torch.tensor([s + [PAD] * (width - len(s)) for s in seqs])


def test_view_drops_the_prefix_and_strip_symbols_and_maps_the_end_symbol():
    view = OutputView(1, end={END}, strip={LANG1}, eos=EOS, pad=PAD)
    rows = _rows([[LANG1, 5, 6, EOS, END], [LANG2, 7, LANG1, 8, END], [LANG1, END]])
    assert view(rows).tolist() == _rows([[5, 6, EOS, EOS], [7, 8, EOS], [EOS]], width=5).tolist()


def test_identity_view_returns_its_input():
    view = OutputView(0, end={EOS}, strip=(), eos=EOS, pad=PAD)
    rows = _rows([[5, 6, EOS]])
    assert view.identity and view(rows) is rows


def test_viewed_reward_equals_the_reward_of_the_rows_without_their_prefix():
    torch.manual_seed(0)
    reward = BoundReward(get_reward("bleu"), PAD, EOS)
    view = OutputView(1, end=(), strip=(), eos=EOS, pad=PAD)
    viewed = ViewedReward(reward, view)
    body = torch.randint(4, 9, (12, 7))
    body[:, -1] = EOS
    refs = torch.randint(4, 9, (12, 2, 6))
    refs[..., -1] = EOS
    lang = torch.where(torch.arange(12) % 2 == 0, LANG1, LANG2).unsqueeze(1)
    hyp = torch.cat([lang, body], dim=1)
    # the references carry the same language token; a wrong one would change nothing either
    with_lang = torch.cat([lang.unsqueeze(1).expand(12, 2, 1), refs], dim=2)
    assert torch.allclose(viewed(hyp, with_lang), reward(body, refs))
    assert torch.allclose(viewed.cost(hyp, with_lang), reward.cost(body, refs))
    # the language token earns nothing: the plain reward of the rows with it differs
    assert not torch.allclose(reward(hyp, with_lang), reward(body, refs))


def test_viewed_prefix_rewards_stay_aligned_with_the_rows():
    torch.manual_seed(1)
    reward = BoundReward(get_reward("bleu"), PAD, EOS)
    viewed = ViewedReward(reward, OutputView(1, end=(), strip=(), eos=EOS, pad=PAD))
    body = torch.randint(4, 9, (6, 5))
    body[:, -1] = EOS
    refs = torch.randint(4, 9, (6, 5))
    refs[:, -1] = EOS
    hyp = torch.cat([torch.full((6, 1), LANG1), body], dim=1)
    refs_lang = torch.cat([torch.full((6, 1), LANG1), refs], dim=1)
    got = viewed.prefix(hyp, refs_lang)
    assert got.shape == hyp.shape
    empty = reward(torch.full((6, 1), EOS), refs)
    assert torch.allclose(got[:, 0], empty)  # the forced token: the value of the empty output
    assert torch.allclose(got[:, 1:], reward.prefix(body, refs))
