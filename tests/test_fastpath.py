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


def test_fp16_kernel_is_exact_per_row_whatever_rows_share_a_call():
    """Each output is one fixed FMA chain: a row's result is bit-identical alone, among γ+1 rows, in a long
    prefill, and when column blocks are split between threads (what makes verification reproduce target-only
    decoding on the fp16 paths). Shapes off the kernel's 64-column tile and with a bias included."""
    from sd2 import fastpath

    torch.manual_seed(0)
    w, b = torch.randn(1000, 270) * 0.1, torch.randn(1000)
    x = torch.randn(13, 270)
    lin = fastpath.packed_linear(w, b)
    ref = x.double() @ w.half().double().t() + b.double()  # fp16 weights, exact sums
    full = lin(x)
    torch.testing.assert_close(full.double(), ref, atol=1e-5, rtol=1e-5)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):  # 13 rows × 270 × 1000 splits its column blocks between 2 threads
            torch.set_num_threads(n)
            assert torch.equal(lin(x), full) and torch.equal(lin(x[3:8]), full[3:8])
            assert all(torch.equal(lin(x[i:i + 1]), full[i:i + 1]) for i in range(13))
    finally:
        torch.set_num_threads(threads)


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
