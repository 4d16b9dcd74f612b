"""Prompt lookup in front of a drafter: what it proposes, that decoding stays lossless (greedy) and exact
(sampling), and that replay reproduces the engine with it."""

import pytest

from sd2 import eagle
from sd2.specdec import NGramIndex, SpecDecoder, eos_ids
from tests.conftest import make_llama, perturbed
from tests.test_specdec import _exact_two_token_dist, _tv

REPEATS = [5, 17, 42, 8, 29, 3, 5, 17, 42, 8, 11, 5, 17]  # a prompt that repeats itself: lookup has work


def test_ngram_index_copies_what_followed_the_longest_latest_match():
    ids = [1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3]
    assert NGramIndex(2).propose(ids, 2) == [7, 5]  # [1, 2, 3] last occurred at 4, followed by 7, 5
    assert NGramIndex(2).propose(ids, 9) == [7, 5, 1, 2, 3]  # up to the end of what is there
    assert NGramIndex(2).propose([4, 1, 2, 6, 2], 3) == []  # only a 1-gram recurs
    assert NGramIndex(1).propose([4, 1, 2, 6, 2], 3) == [6, 2]
    assert NGramIndex(3).propose([1, 2, 8, 1, 2], 3) == []
    grown, index = [], NGramIndex(1)  # kept up to date incrementally: equal to a fresh index at every length
    for tok in [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 1, 4, 1]:
        grown.append(tok)
        assert index.propose(list(grown), 3) == NGramIndex(1).propose(list(grown), 3)


@pytest.mark.parametrize("lookup", [1, 2, 3])
@pytest.mark.parametrize("kind", ["none", "token", "feature"])
def test_lookup_is_lossless_and_counts_its_steps(kind, lookup):
    t = make_llama(64, layers=2, seed=3, eos=7, hidden=32)
    d = {"none": None, "token": perturbed(t, 0.5, seed=1), "feature": eagle.build(t)}[kind]
    base = SpecDecoder(t).generate(REPEATS, 40)
    for gamma in (1, 3, 5):
        res = SpecDecoder(t, d, gamma=gamma, lookup=lookup).generate(REPEATS, 40)
        assert res.tokens == base.tokens
        assert res.looked_up > 0  # the prompt repeats: some drafts were copies
        assert all(0 <= s.accepted <= s.drafted <= gamma for s in res.steps)
        assert sum(1 + s.accepted for s in res.steps) == len(res.tokens)


@pytest.mark.parametrize("drafter", ["none", "token"])
def test_lookup_keeps_the_sampling_distribution(drafter):
    V, T, N = 6, 1.0, 3000
    t = make_llama(V, seed=5, eos=None, hidden=16, std=0.6)
    d = make_llama(V, seed=6, eos=None, hidden=16, std=0.6) if drafter == "token" else None
    prompt = [1, 2, 3, 1, 2]  # the suffix [1, 2] occurred before: the first step drafts the copy [3, 1]
    exact = _exact_two_token_dist(t, prompt, T)
    spec = SpecDecoder(t, d, gamma=2, temperature=T, lookup=2)
    emp: dict = {}
    kept = 0
    for s in range(N):
        r = spec.generate(prompt, 2, seed=s)
        assert r.looked_up >= 1
        kept += r.steps[0].accepted > 0
        emp[tuple(r.tokens)] = emp.get(tuple(r.tokens), 0) + 1
    assert 0 < kept < N  # the copy is accepted in some runs and rejected in others
    assert _tv(emp, exact, N) < 0.06


@pytest.mark.parametrize("kind", ["token", "feature"])
def test_replay_with_lookup_equals_the_engine(kind):
    from sd2.evaluate import _replayer

    t = make_llama(64, layers=2, seed=3, eos=7, hidden=32)
    d = perturbed(t, 0.3, seed=2) if kind == "token" else eagle.build(t)
    eos = eos_ids(t)
    copied = 0
    for prompt in (REPEATS, REPEATS[3:] + REPEATS[:3]):
        for max_new in (17, 40):
            tokens = SpecDecoder(t).generate(prompt, max_new).tokens
            replay = _replayer(t, d, prompt, tokens, max_new, eos, lookup=2)
            for gamma in (1, 3, 4):
                eng = SpecDecoder(t, d, gamma=gamma, lookup=2).generate(prompt, max_new)
                rep = replay(gamma)
                assert [(s.drafted, s.accepted) for s in rep.steps] == [(s.drafted, s.accepted) for s in eng.steps]
                assert rep.looked_up == eng.looked_up and rep.tokens == eng.tokens
                copied += eng.looked_up
    assert copied > 0


def test_lookup_out_of_range():
    from sd2.config import EvalOptions

    t = make_llama(32, seed=1)
    with pytest.raises(ValueError, match="lookup"):
        SpecDecoder(t, t, lookup=-1)
    with pytest.raises(ValueError, match="lookup"):
        EvalOptions(lookup=9)
