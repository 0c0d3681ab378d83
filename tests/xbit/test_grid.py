"""Group grids: the min-max fit of the baselines and xbit's squared-error fit (clip search)."""

import pytest
import torch

from xbit.grid import CLIP_FACTORS, dequantize_codes, fit_grid, fit_span, quantize_codes


def row_errors(w, scale, zero, bits):
    q = dequantize_codes(quantize_codes(w, scale[:, None], zero[:, None], bits), scale[:, None], zero[:, None])
    return (w - q).pow(2).sum(dim=1)


def heavy_tailed(rows=200, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.distributions.StudentT(4.0).sample((rows, cols)) + 0.1 * torch.randn(rows, 1, generator=g)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_mse_grid_is_the_best_candidate_range_for_every_row(bits):
    torch.manual_seed(bits)
    w = heavy_tailed()
    scale, zero = fit_grid(w, bits, "mse")
    got = row_errors(w, scale, zero, bits)
    for f in CLIP_FACTORS:  # brute force: every candidate range, one at a time
        lo, hi = w.min(dim=1).values * f, w.max(dim=1).values * f
        s, z = fit_span(torch.stack([lo, hi], dim=1), bits)
        assert (got <= row_errors(w, s, z, bits) + 1e-6).all()


@pytest.mark.parametrize("bits, gain", [(2, 0.7), (3, 0.85)])
def test_mse_grid_pays_at_low_bits(bits, gain):
    torch.manual_seed(0)
    w = heavy_tailed()
    mse = row_errors(w, *fit_grid(w, bits, "mse"), bits).sum()
    minmax = row_errors(w, *fit_grid(w, bits, "minmax"), bits).sum()
    assert mse < gain * minmax


def test_mse_grid_values_are_float16_and_codes_in_range():
    w = heavy_tailed(rows=16)
    scale, zero = fit_grid(w, 3, "mse")
    assert torch.equal(scale, scale.half().float()) and torch.equal(zero, zero.half().float())
    codes = quantize_codes(w, scale[:, None], zero[:, None], 3)
    assert codes.min() >= 0 and codes.max() <= 7


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_minmax_is_the_published_gptq_grid(bits):
    """The baselines' grid as GPTQ's Quantizer computes it (asymmetric, per row): range widened to include 0,
    scale = range / maxq, zero = round(-min / scale), codes clamp(round(w / scale) + zero) - written out here."""
    w = heavy_tailed(rows=32) + torch.linspace(-0.5, 3.0, 32)[:, None]  # rows off centre: some all positive
    maxq = 2**bits - 1
    lo, hi = torch.minimum(w.min(1).values, torch.zeros(32)), torch.maximum(w.max(1).values, torch.zeros(32))
    scale = ((hi - lo) / maxq).half().float()
    zero = torch.round(-lo / scale)
    scale_got, zero_got = fit_grid(w, bits, "minmax")
    torch.testing.assert_close(scale_got, scale, rtol=0, atol=0)
    torch.testing.assert_close(zero_got, zero, rtol=0, atol=0)
    codes = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, maxq)
    assert torch.equal(quantize_codes(w, scale_got[:, None], zero_got[:, None], bits), codes.long())
    assert (zero_got == zero_got.round()).all() and zero_got.min() >= 0 and zero_got.max() <= maxq


def test_unknown_grid_is_refused():
    with pytest.raises(ValueError, match="unknown grid 'l1'"):
        fit_grid(torch.randn(4, 8), 3, "l1")


def test_mse_fit_in_row_slices_equals_one_fit_of_all_rows(monkeypatch):
    import xbit.grid as grid

    w = torch.randn(1500, 128, generator=torch.Generator().manual_seed(4)) * torch.linspace(0.01, 1.0, 1500)[:, None]
    sliced = fit_grid(w, 3, "mse")
    monkeypatch.setattr(grid, "MSE_ROWS_ELEMENTS", w.numel())
    whole = fit_grid(w, 3, "mse")
    assert w.numel() > 1 << 17  # the default slices it
    assert torch.equal(sliced[0], whole[0]) and torch.equal(sliced[1], whole[1])
