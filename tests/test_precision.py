"""precision: auto picks bf16 only where it measures faster, on any CPU; an explicit choice is kept."""

import pytest

from mmdit.precision import bf16_speedup, choose_precision


def test_auto_follows_the_measurement():
    assert choose_precision("auto", "cpu", speedup=lambda device: 2.3) == "bf16"    # native bf16 (AVX512-BF16, AMX)
    assert choose_precision("auto", "cpu", speedup=lambda device: 0.002) == "fp32"  # AVX2 only: emulated bf16
    assert choose_precision("auto", "cpu", speedup=lambda device: 1.05) == "fp32"   # no clear win: keep fp32


def test_an_explicit_precision_is_kept_and_a_bad_one_named():
    never = lambda device: pytest.fail("an explicit precision must not be measured")
    assert choose_precision("bf16", "cpu", speedup=never) == "bf16"
    assert choose_precision("fp32", "cpu", speedup=never) == "fp32"
    with pytest.raises(ValueError, match="precision 'fp8' is not one of auto, bf16, fp32"):
        choose_precision("fp8", "cpu")


def test_the_measurement_runs_here():
    ratio = bf16_speedup("cpu", width=64, tokens=256, repeats=2)
    assert ratio > 0 and ratio == ratio   # finite and positive; which side wins depends on this CPU
