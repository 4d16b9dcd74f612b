import copy

import torch

from sd2.fastpath import PackedFP16Linear, pack_fp16
from sd2.specdec import SpecDecoder
from tests.conftest import make_llama


def test_packed_linear_close_to_fp32():
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(3, 5, 64)
    ref = lin(x)
    got = PackedFP16Linear(lin)(x)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)


def test_packed_drafter_keeps_greedy_lossless_and_target_path_is_self_consistent():
    t = make_llama(96, seed=2, eos=None)
    prompt = [3, 9, 27, 81 % 96]
    base = SpecDecoder(t).generate(prompt, 30)
    d = pack_fp16(copy.deepcopy(t))
    assert not any(isinstance(m, torch.nn.Linear) for m in d.modules())
    res = SpecDecoder(t, d, gamma=4).generate(prompt, 30)
    assert res.tokens == base.tokens and res.mal > 2.0
    tp = pack_fp16(copy.deepcopy(t))
    base_p = SpecDecoder(tp).generate(prompt, 30)
    assert SpecDecoder(tp, d, gamma=3).generate(prompt, 30).tokens == base_p.tokens
