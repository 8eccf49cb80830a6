"""Token-level loss smoothing: neighbours, targets, losses, embeddings, CLI."""

import importlib.util
import math
import os
import random
import sys

import pytest
import torch

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from fairseq_seqlevel.smoothing.embeddings import (  # noqa: E402
    EmbeddingFileError,
    build_ppmi_svd_embeddings,
    load_text_embeddings,
)
from fairseq_seqlevel.smoothing.targets import (  # noqa: E402
    SparseTokenTargets,
    rare_token_penalty,
    smoothed_target_entropy,
    smoothed_token_kl,
    smoothed_token_loss,
    topk_cosine_neighbours,
)


def _embeddings(V=120, D=12, zero_rows=(5, 17), seed=0):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(V, D, generator=g)
    for r in zero_rows:
        E[r] = 0.0
    return E


def _dense_reference(E, k, candidate_mask=None):
    """Brute force: full cosine matrix, per-row python sort."""
    V = E.size(0)
    nz = E.norm(dim=1) > 0
    eligible = nz.clone() if candidate_mask is None else nz & candidate_mask
    U = torch.nn.functional.normalize(E.double(), dim=1)
    C = U @ U.T
    ids = torch.empty(V, k, dtype=torch.long)
    sims = torch.full((V, k), float("-inf"), dtype=torch.float64)
    for i in range(V):
        ids[i] = i
        sims[i, 0] = 1.0
        if not eligible[i]:  # no vector, or a special symbol: one-hot
            continue
        cand = [j for j in range(V) if j != i and eligible[j]]
        cand.sort(key=lambda j: -C[i, j].item())
        for slot, j in enumerate(cand[: k - 1], start=1):
            ids[i, slot] = j
            sims[i, slot] = C[i, j]
    return ids, sims, C


# ----------------------------------------------------------- neighbours
@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_topk_chunked_equals_dense_bruteforce(chunk_size):
    E = _embeddings()
    mask = torch.ones(E.size(0), dtype=torch.bool)
    mask[[0, 3, 50]] = False
    for cm in (None, mask):
        ids, sims = topk_cosine_neighbours(E, 9, chunk_size=chunk_size, candidate_mask=cm)
        ref_ids, ref_sims, _ = _dense_reference(E, 9, cm)
        assert torch.equal(ids, ref_ids)
        assert torch.allclose(sims.double(), ref_sims, atol=1e-5)
        assert ids.dtype == torch.long and sims.dtype == torch.float32
        if cm is not None:  # masked tokens never appear in others' lists
            others = ids[:, 1:][torch.isfinite(sims[:, 1:])]
            assert not torch.isin(others, torch.tensor([0, 3, 50])).any()


def test_self_always_slot0_and_zero_rows_alone():
    E = _embeddings(V=40, zero_rows=(2,))
    E[7] = E[8] * 3.0  # same direction: cosine 1 with 8, self must still be first
    for k in (1, 5, 40):
        ids, sims = topk_cosine_neighbours(E, k, chunk_size=6)
        assert torch.equal(ids[:, 0], torch.arange(40))
        assert torch.all(sims[:, 0] == 1.0)
        assert torch.all(sims <= 1.0)
        # each id at most once among the finite slots
        for i in range(40):
            row = ids[i][torch.isfinite(sims[i])]
            assert row.unique().numel() == row.numel()
        # zero embedding: only itself
        assert torch.all(ids[2] == 2) and torch.all(torch.isneginf(sims[2, 1:]))
        # no one lists the unknown word
        assert not (ids[:, 1:][torch.isfinite(sims[:, 1:])] == 2).any()
    ids, sims = topk_cosine_neighbours(E, 3)
    assert ids[7, 1] == 8 and ids[8, 1] == 7


def test_topk_bad_arguments():
    with pytest.raises(ValueError):
        topk_cosine_neighbours(torch.randn(5, 3), 6)
    with pytest.raises(ValueError):
        topk_cosine_neighbours(torch.randn(5, 3), 0)


# -------------------------------------------------------------- penalty
def test_rare_token_penalty_hand_example():
    freqs = torch.tensor([0.0, 10.0, 20.0, 5.0, 10.0, 1000.0])
    ids = torch.tensor([[1, 2, 3, 0, 4, 5], [0, 1, 2, 3, 4, 5]])
    beta = 0.3
    pen = rare_token_penalty(ids, freqs, beta, gold=torch.tensor([1, 0]))
    # row 0: gold frequency 10 -> min(f/10, 10/f)
    expected0 = [-beta * min(f / 10.0, 10.0 / f) if f > 0 else 0.0 for f in [10, 20, 5, 0, 10, 1000]]
    assert pen[0].tolist() == pytest.approx(expected0)
    # row 1: gold frequency 0 -> no penalty at all (finite)
    assert torch.all(pen[1] == 0) and torch.isfinite(pen).all()
    # default gold = row index
    pen_default = rare_token_penalty(torch.tensor([[0, 1], [1, 2]]), freqs, beta)
    assert pen_default[1].tolist() == pytest.approx([-beta, -beta * 0.5])
    with pytest.raises(ValueError):
        rare_token_penalty(ids, freqs, -1.0)


def test_from_embeddings_penalty_spares_self():
    E = _embeddings(V=30, zero_rows=())
    freqs = torch.randint(1, 50, (30,)).float()
    base = SparseTokenTargets.from_embeddings(E, 6)
    t = SparseTokenTargets.from_embeddings(E, 6, freqs=freqs, beta=0.4)
    lit = SparseTokenTargets.from_embeddings(E, 6, freqs=freqs, beta=0.4, penalize_self=True)
    pen = rare_token_penalty(base.ids, freqs, 0.4)
    assert torch.all(t.scores[:, 0] == 1.0)
    assert torch.allclose(t.scores[:, 1:], base.scores[:, 1:] + pen[:, 1:])
    assert torch.allclose(lit.scores, base.scores + pen)
    # the gold token is the mode for every row by default
    assert torch.all(t.scores.argmax(dim=1) == 0)


def test_literal_penalty_can_unseat_gold_but_default_does_not():
    # token 1 is very similar to token 0 but much rarer
    E = torch.tensor([[1.0, 0.0], [0.95, math.sqrt(1 - 0.95**2)], [0.0, 1.0]])
    freqs = torch.tensor([1000.0, 1.0, 500.0])
    tgt = torch.tensor([0])
    lit = SparseTokenTargets.from_embeddings(E, 3, freqs=freqs, beta=0.5, penalize_self=True)
    ids, p = lit.distribution(tgt, 1e-4)
    assert ids[0, p[0].argmax()] == 1  # literal eq. 14: neighbour outranks gold
    ours = SparseTokenTargets.from_embeddings(E, 3, freqs=freqs, beta=0.5)
    ids, p = ours.distribution(tgt, 1e-4)
    assert ids[0, p[0].argmax()] == 0 and p[0, 0] == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------- distributions
@pytest.mark.parametrize("tau", [1e-4, 0.05, 1.0, 100.0])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_distribution_is_a_distribution(tau, beta):
    E = _embeddings(V=60)
    freqs = torch.arange(60).float()  # token 0 has frequency 0
    t = SparseTokenTargets.from_embeddings(E, 7, freqs=freqs, beta=beta)
    target = torch.randint(0, 60, (3, 11))
    ids, p = t.distribution(target, tau)
    assert ids.shape == (3, 11, 7) and p.shape == (3, 11, 7)
    assert torch.isfinite(p).all() and (p >= 0).all()
    assert torch.allclose(p.sum(-1), torch.ones(3, 11), atol=1e-5)
    assert torch.equal(ids[..., 0], target)
    # zero-embedding rows: all mass on the token itself
    ids, p = t.distribution(torch.tensor([5, 17]), tau)
    assert torch.all(p[:, 0] == 1.0)
    with pytest.raises(ValueError):
        t.distribution(target, 0.0)


def test_truncation_equals_conditioned_full_distribution_and_tail_bound():
    V, k, tau, beta = 80, 10, 0.2, 0.3
    E = _embeddings(V=V, zero_rows=(4,))
    freqs = torch.randint(0, 100, (V,)).double()
    t = SparseTokenTargets.from_embeddings(E, k, freqs=freqs, beta=beta)
    _, _, C = _dense_reference(E, k)
    nz = E.norm(dim=1) > 0
    full_ids = torch.arange(V).expand(V, V)
    S = C + rare_token_penalty(full_ids, freqs, beta).double()
    S.fill_diagonal_(1.0)  # gold not penalized
    S[:, ~nz] = float("-inf")
    S[~nz] = float("-inf")
    S[torch.arange(V), torch.arange(V)] = 1.0
    full = torch.softmax(S / tau, dim=1)
    ids, p = t.distribution(torch.arange(V), tau)
    kept = full.gather(1, ids)
    # slots with -inf score are duplicates of self with p = 0: zero them out
    kept = torch.where(p > 0, kept, torch.zeros_like(kept))
    dropped = 1.0 - kept.sum(1)
    assert torch.allclose(p.double(), kept / kept.sum(1, keepdim=True), atol=1e-5)
    bound = t.tail_mass_bound(tau).double()
    assert torch.all(dropped <= bound + 1e-6)
    assert bound.max() > 0.01  # the bound is not vacuous-zero at this tau...
    assert torch.all(t.tail_mass_bound(1e-3) < 1e-30)  # ...and vanishes as tau -> 0
    full_k = SparseTokenTargets.from_embeddings(E, V, freqs=freqs, beta=beta)
    assert torch.all(full_k.tail_mass_bound(tau) == 0)
    ids_full, p_full = full_k.distribution(torch.arange(V), tau)
    dense_from_sparse = torch.zeros(V, V, dtype=torch.float64).scatter_add_(1, ids_full, p_full.double())
    assert torch.allclose(dense_from_sparse, full, atol=1e-5)


# ---------------------------------------------------------------- losses
def _setup_loss(V=90, N=33, k=8, beta=0.0, seed=1):
    E = _embeddings(V=V, seed=seed)
    freqs = torch.randint(1, 100, (V,)).float()
    t = SparseTokenTargets.from_embeddings(E, k, freqs=freqs, beta=beta)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g, dtype=torch.float64).float()
    target = torch.randint(0, V, (N,), generator=g)
    return t, logits, target


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_tau_to_zero_gives_nll_value_and_gradient(beta):
    t, logits, target = _setup_loss(beta=beta)
    pad = 1
    target[[0, 5, 9]] = pad
    x1 = logits.clone().requires_grad_()
    lp1 = torch.log_softmax(x1, -1)
    loss = smoothed_token_loss(lp1, target, t, 1e-4, ignore_index=pad)
    x2 = logits.clone().requires_grad_()
    lp2 = torch.log_softmax(x2, -1)
    nll = -lp2.gather(1, target.unsqueeze(1)).squeeze(1)
    nll = nll.masked_fill(target == pad, 0.0)
    assert torch.isfinite(loss).all()
    assert torch.allclose(loss, nll, atol=1e-5)
    assert torch.all(loss[[0, 5, 9]] == 0)
    loss.sum().backward()
    nll.sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-5)
    assert torch.all(x1.grad[[0, 5, 9]] == 0)
    kl = smoothed_token_kl(torch.log_softmax(logits, -1), target, t, 1e-4, ignore_index=pad)
    assert torch.allclose(kl, nll.detach(), atol=1e-5)


@pytest.mark.parametrize("tau", [0.1, 2.0])
def test_loss_matches_dense_cross_entropy(tau):
    t, logits, target = _setup_loss(beta=0.3)
    target[3] = -100  # out-of-range ignore index must be safe
    V = logits.size(1)
    x1 = logits.clone().requires_grad_()
    loss = smoothed_token_loss(torch.log_softmax(x1, -1), target, t, tau, ignore_index=-100)
    valid = target != -100
    ids, p = t.distribution(target[valid], tau)
    q = torch.zeros(int(valid.sum()), V).scatter_add_(1, ids, p)
    x2 = logits.clone().requires_grad_()
    ref = torch.zeros(len(target))
    ref[valid] = -(q * torch.log_softmax(x2[valid], -1)).sum(-1)
    assert torch.allclose(loss, ref, atol=1e-5)
    loss.sum().backward()
    ref.sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-6)
    # KL = CE - H(target) >= 0, same gradient
    lp = torch.log_softmax(logits, -1)
    kl = smoothed_token_kl(lp, target, t, tau, ignore_index=-100)
    ent = smoothed_target_entropy(target, t, tau, ignore_index=-100)
    assert torch.allclose(kl, loss.detach() - ent, atol=1e-5)
    assert torch.all(kl > -1e-5) and kl[3] == 0 and ent[3] == 0
    x3 = logits.clone().requires_grad_()
    smoothed_token_kl(torch.log_softmax(x3, -1), target, t, tau, ignore_index=-100).sum().backward()
    assert torch.allclose(x3.grad, x2.grad, atol=1e-6)


def test_kl_zero_when_model_equals_target_with_neg_inf_lprobs():
    t, logits, target = _setup_loss(V=40, N=6, k=5)
    ids, p = t.distribution(target, 0.3)
    q = torch.zeros(6, 40).scatter_add_(1, ids, p)
    lp = q.log()  # -inf outside the support: 0 * -inf must not give NaN
    kl = smoothed_token_kl(lp, target, t, 0.3)
    assert torch.isfinite(kl).all() and torch.allclose(kl, torch.zeros(6), atol=1e-5)
    ce = smoothed_token_loss(lp.view(2, 3, 40), target.view(2, 3), t, 0.3)
    assert ce.shape == (2, 3)


def test_state_dict_round_trip_and_device_cache():
    t, logits, target = _setup_loss(V=30, N=5, k=4)
    t2 = SparseTokenTargets.from_state_dict(t.state_dict())
    lp = torch.log_softmax(logits, -1)
    assert torch.equal(smoothed_token_loss(lp, target, t, 0.5), smoothed_token_loss(lp, target, t2, 0.5))
    with pytest.raises(ValueError):
        SparseTokenTargets(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2))  # self not first


# ------------------------------------------------------------ PPMI / SVD
def _synthetic_corpus(n=300, seed=0):
    rng = random.Random(seed)
    # ids: 0 pad, 1 eos, 2 the, 3 sat, 4 on, 5 mat, 6 cat, 7 dog, 8 i, 9 drove,
    # 10 to, 11 town, 12 car, 13 truck, 14 never used
    sents = []
    for _ in range(n):
        if rng.random() < 0.5:
            s = [2, rng.choice([6, 7]), 3, 4, 2, 5, 1]
        else:
            s = [8, 9, 2, rng.choice([12, 13]), 10, 11, 1]
        sents.append(torch.tensor(s))
    return sents


def _reference_ppmi(sents, V, window, ignore, cds):
    """Loop-based co-occurrence counts (inside sentences) -> PPMI."""
    C = torch.zeros(V, V, dtype=torch.float64)
    for s in sents:
        s = s.tolist()
        for i, a in enumerate(s):
            for j in range(max(0, i - window), min(len(s), i + window + 1)):
                if j != i and a not in ignore and s[j] not in ignore:
                    C[a, s[j]] += 1
    ctx = C.sum(0) ** cds
    p_ctx = ctx / ctx.sum()
    with torch.no_grad():
        pmi = torch.log(C) - torch.log(C.sum(1, keepdim=True)) - torch.log(p_ctx)
    return torch.where(C > 0, pmi.clamp_min(0), torch.zeros_like(pmi))


@pytest.mark.parametrize("cds", [1.0, 0.75])
def test_ppmi_matches_loop_reference(cds):
    rng = random.Random(5)
    V = 9
    sents = [torch.tensor([rng.randrange(V) for _ in range(rng.randint(1, 8))]) for _ in range(40)]
    M = _reference_ppmi(sents, V, 3, {0}, cds)
    # eig_power = 1 and dim = V: E = U S, so E E^T = M M^T exactly
    E = build_ppmi_svd_embeddings(sents, V, V, 3, ignore_ids=[0], cds_alpha=cds, eig_power=1.0)
    assert torch.allclose((E @ E.T).double(), M @ M.T, atol=1e-4 * float((M @ M.T).abs().max()))
    # a flat stream counts across sentence boundaries
    flat = torch.cat(sents)
    Mf = _reference_ppmi([flat], V, 3, {0}, cds)
    Ef = build_ppmi_svd_embeddings(flat, V, V, 3, ignore_ids=[0], cds_alpha=cds, eig_power=1.0)
    assert torch.allclose((Ef @ Ef.T).double(), Mf @ Mf.T, atol=1e-4 * float((Mf @ Mf.T).abs().max()))


def _cos(E, a, b):
    return torch.nn.functional.cosine_similarity(E[a], E[b], dim=0).item()


def test_ppmi_svd_identical_contexts_are_closer():
    sents = _synthetic_corpus()
    E = build_ppmi_svd_embeddings(sents, vocab_size=15, dim=6, window=2, ignore_ids=[0])
    assert E.shape == (15, 6) and torch.isfinite(E).all()
    assert _cos(E, 6, 7) > 0.95 and _cos(E, 12, 13) > 0.95
    assert _cos(E, 6, 7) > _cos(E, 6, 12) + 0.5
    assert _cos(E, 12, 13) > _cos(E, 13, 7) + 0.5
    assert torch.all(E[0] == 0) and torch.all(E[14] == 0)  # pad / unseen: unknown
    ids, _ = topk_cosine_neighbours(E, 2)
    assert ids[6, 1] == 7 and ids[13, 1] == 12
    # randomized sparse path agrees with the exact dense one (up to rotation
    # inside the spectrum, so compare cosine matrices)
    E2 = build_ppmi_svd_embeddings(sents, 15, 6, 2, ignore_ids=[0], dense_svd_max_vocab=1)
    U1 = torch.nn.functional.normalize(E, dim=1)
    U2 = torch.nn.functional.normalize(E2, dim=1)
    assert torch.allclose(U1 @ U1.T, U2 @ U2.T, atol=1e-3)
    # one flat stream (windows cross sentences) still works, dim > V pads zeros
    E3 = build_ppmi_svd_embeddings(torch.cat(sents), 15, 20, 2, ignore_ids=[0])
    assert E3.shape == (15, 20) and torch.all(E3[:, 15:] == 0)
    assert _cos(E3, 6, 7) > _cos(E3, 6, 12)


# ---------------------------------------------------------- text loader
class _Dict:
    """Stand-in for a fairseq Dictionary (symbols + count)."""

    def __init__(self, symbols, counts):
        self.symbols, self.count = list(symbols), list(counts)


def test_text_loader_maps_pieces_and_reports_coverage(tmp_path):
    path = tmp_path / "vec.txt"
    lines = [
        "7 3",
        "the 1 0 0",
        "cat 0 1 0",
        "\u2581cat 0 0 1",  # exact symbol beats the stripped form
        "ing 1 1 0",
        "paris 0 1 1",  # only reachable by lower-casing "▁Paris"
        "play 2 0 0",
        "two words 3 3 3",  # a word with a space (GloVe 840B style)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    symbols = ["<s>", "<pad>", "</s>", "<unk>", "\u2581the", "\u2581cat", "ing", "\u2581Paris",
               "tion", "play@@", "two words"]
    counts = [1, 1, 1, 1, 50, 20, 10, 5, 7, 3, 4]
    E, rep = load_text_embeddings(str(path), _Dict(symbols, counts))
    assert E.shape == (11, 3)
    row = {s: E[i].tolist() for i, s in enumerate(symbols)}
    assert row["\u2581the"] == [1, 0, 0]
    assert row["\u2581cat"] == [0, 0, 1]
    assert row["ing"] == [1, 1, 0]
    assert row["\u2581Paris"] == [0, 1, 1]
    assert row["play@@"] == [2, 0, 0]
    assert row["two words"] == [3, 3, 3]
    assert row["tion"] == [0, 0, 0]  # non-initial piece not in the file: zero
    covered = ["\u2581the", "\u2581cat", "ing", "\u2581Paris", "play@@", "two words"]
    assert rep.num_covered == len(covered) and rep.num_symbols == 11
    assert rep.type_coverage == pytest.approx(len(covered) / 11)
    tok = sum(c for s, c in zip(symbols, counts) if s in covered) / sum(counts)
    assert rep.token_coverage == pytest.approx(tok)
    assert (rep.matched_exact, rep.matched_stripped, rep.matched_lowercase) == (3, 2, 1)
    assert "tion" in rep.missing_examples and rep.file_vectors == 7 and rep.dim == 3
    assert rep.covered.tolist() == [s in covered for s in symbols]
    # a plain list of symbols works too (no token coverage)
    E2, rep2 = load_text_embeddings(str(path), symbols, lowercase_fallback=False)
    assert rep2.token_coverage is None and torch.all(E2[symbols.index("\u2581Paris")] == 0)


@pytest.mark.parametrize(
    "content,lineno",
    [
        ("a 1 2\nb 1 x\n", 2),  # non-numeric
        ("a 1 2\nb 1\n", 2),  # too few fields
        ("3 2\na 1 2\nb 1 2\n", 3),  # header count vs. truncated file
        ("a 1 2\nb nan 1\n", 2),  # non-finite
        ("", 1),  # empty
    ],
)
def test_text_loader_bad_file_one_line_error(tmp_path, content, lineno):
    path = tmp_path / "bad.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(EmbeddingFileError) as ei:
        load_text_embeddings(str(path), ["a", "b"])
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"{path}:{lineno}: ")


# ---------------------------------------------------------------- CLI
def _load_cli():
    spec = importlib.util.spec_from_file_location(
        "build_token_embeddings", os.path.join(_REPO, "examples", "build_token_embeddings.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _binarize(tmp_path, sents_words):
    from fairseq.data import Dictionary, indexed_dataset

    d = Dictionary()
    for s in sents_words:
        for w in s:
            d.add_symbol(w)
    d.finalize(padding_factor=8)  # adds madeupword fillers: never seen in data
    d.save(str(tmp_path / "dict.en.txt"))
    prefix = str(tmp_path / "train.de-en.en")
    builder = indexed_dataset.make_builder(prefix + ".bin", impl="mmap", vocab_size=len(d))
    sents = []
    for s in sents_words:
        ids = d.encode_line(" ".join(s), add_if_not_exist=False, append_eos=True).long()
        builder.add_item(ids)
        sents.append(ids)
    builder.finalize(prefix + ".idx")
    return d, sents


def test_cli_round_trip_through_loader(tmp_path, capsys):
    from fairseq.data import Dictionary

    rng = random.Random(3)
    words = []
    for _ in range(120):
        if rng.random() < 0.5:
            words.append(["the", rng.choice(["cat", "dog"]), "sat", "on", "the", "mat"])
        else:
            words.append(["i", "drove", "the", rng.choice(["car", "truck"]), "to", "town"])
    d, sents = _binarize(tmp_path, words)
    out = tmp_path / "emb.en.txt"
    cli = _load_cli()
    rc = cli.main(["--data", str(tmp_path), "--lang", "en", "--dim", "6", "--window", "2", "--out", str(out)])
    assert rc == 0
    d2 = Dictionary.load(str(tmp_path / "dict.en.txt"))
    E, rep = load_text_embeddings(str(out), d2)
    assert rep.type_coverage == 1.0 and rep.token_coverage == 1.0
    assert rep.matched_exact == len(d2) and E.shape == (len(d2), 6)
    ref = build_ppmi_svd_embeddings(sents, len(d), 6, 2, ignore_ids=[d.pad()])
    assert torch.allclose(E, ref, rtol=1e-5, atol=1e-6)
    assert _cos(E, d.index("cat"), d.index("dog")) > _cos(E, d.index("cat"), d.index("car"))
    assert torch.all(E[d.pad()] == 0)
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["dict.en.txt", "train.de-en.en.bin", "train.de-en.en.idx", "emb.en.txt"]
    )  # no temp file left behind

    capsys.readouterr()
    rc = cli.main(["--data", str(tmp_path / "nope"), "--lang", "en", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err and str(tmp_path / "nope") in err
    rc = cli.main(["--data", str(tmp_path), "--lang", "fr", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err and "train.SRC-TGT.fr" in err


def test_expanded_lprobs_equal_their_copy_value_and_gradient():
    """raml --raml-lazy scores [B, L, T] sampled targets against the reference's
    [B, 1, T, V] distributions expanded to L: same as a materialized copy."""
    t, logits, target = _setup_loss(beta=0.0)
    V = logits.size(1)
    n = (target.numel() // 4) * 4
    base = logits[:n].view(2, 1, n // 2, V)
    sampled = target[:n].view(2, 1, n // 2).repeat(1, 3, 1)
    sampled[:, 1] = sampled[:, 1].roll(1, dims=-1)
    sampled[1, 2, 0] = -100
    x1 = base.clone().requires_grad_()
    got = smoothed_token_loss(torch.log_softmax(x1, -1).expand(-1, 3, -1, -1), sampled, t, 0.5, ignore_index=-100)
    x2 = base.clone().requires_grad_()
    ref = smoothed_token_loss(torch.log_softmax(x2, -1).repeat(1, 3, 1, 1), sampled, t, 0.5, ignore_index=-100)
    assert got.shape == sampled.shape and got[1, 2, 0] == 0
    torch.testing.assert_close(got, ref)
    (got * torch.arange(1.0, 4.0).view(1, 3, 1)).sum().backward()
    (ref * torch.arange(1.0, 4.0).view(1, 3, 1)).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
