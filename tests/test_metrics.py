import pytest
import torch

from sd2 import metrics
from sd2.specdec import DecodeResult, Step
from tests.conftest import make_llama


def _res(tokens, passes, steps):
    return DecodeResult(tokens=list(range(tokens)), target_passes=passes, steps=[Step(*s) for s in steps])


def test_mal_acceptance_and_positions():
    rs = [_res(10, 4, [(4, 4), (4, 2), (4, 0), (4, 0)]), _res(3, 1, [(2, 2)])]
    assert metrics.mal(rs) == pytest.approx(13 / 5)
    assert metrics.acceptance_rate(rs) == pytest.approx(8 / 18)
    pos = metrics.per_position_acceptance(rs, 4)
    assert pos == pytest.approx([3 / 5, 3 / 5, 1 / 4, 1 / 4])
    lo, hi = metrics.bootstrap_ci(rs)
    assert lo <= metrics.mal(rs) <= hi


def test_macs_count_only_nonzeros():
    m = make_llama(64, layers=2, hidden=32)
    dense = metrics.macs_per_token(m, context=128)
    zeroed = 0
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                w = mod.weight
                mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) < 0.5
                zeroed += int((w[mask] != 0).sum())
                w[mask] = 0
    sparse = metrics.macs_per_token(m, context=128)
    assert sparse["macs_per_token"] == dense["macs_per_token"] - zeroed
    assert sparse["attention_macs"] == dense["attention_macs"] == 2 * 2 * 4 * 8 * 128
    assert dense["linear_macs"] == dense["dense_linear_macs"]


def test_weight_bytes_count_zeros_on_dense_kernels_and_nonzeros_with_an_index_on_sparse_ones():
    m = make_llama(64, layers=2, hidden=32)
    weights = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    before = metrics.weight_bytes_per_token(m, 4)
    assert before == {"dense": 4 * weights, "nonzero": 6 * weights}  # fp32 + a 16-bit column index each
    with torch.no_grad():
        w = m.model.layers[0].mlp.up_proj.weight
        zeros = w.numel() // 2
        w.view(-1)[:zeros] = 0
    after = metrics.weight_bytes_per_token(m, 2, extra_head_rows=3)
    head = 3 * m.get_output_embeddings().weight.shape[1]
    assert after["dense"] == 2 * (weights + head)  # fp16, zeros still read
    assert after["nonzero"] == 4 * (weights - zeros + head)


def test_theoretical_speedup():
    assert metrics.theoretical_speedup(5.0, 4, 0.0) == 5.0
    assert metrics.theoretical_speedup(3.0, 4, 0.5) == pytest.approx(1.0)
