"""Tests for banjax.summary: params and FLOPs against independent counts, and the CLI."""

import subprocess
import sys

import pytest

from banjax import models, summary


def _taps(n, k, stride):
    """Kernel taps per axis that land inside an n-pixel input (padding k//2), over all outputs."""
    p = k // 2
    return sum(sum(0 <= o * stride - p + j < n for j in range(k)) for o in range(n // stride))


def _conv_flops(hw, k, stride, cin, cout):
    return 2 * _taps(hw, k, stride) ** 2 * cin * cout


def _preact_resnet8_flops(hw, classes):
    """Hand count of preact-resnet-8's convs and classifier (multiply-add = 2, padding excluded)."""
    total, cin = _conv_flops(hw, 3, 1, 3, 16), 16
    for stage, width in enumerate((16, 32, 64)):
        stride = 1 if stage == 0 else 2
        total += _conv_flops(hw, 3, stride, cin, width)
        if cin != width or stride != 1:
            total += _conv_flops(hw, 1, stride, cin, width)
        hw //= stride
        total += _conv_flops(hw, 3, 1, width, width)
        cin = width
    return total + 2 * 64 * classes


@pytest.mark.parametrize("image_size", [8, 16])
def test_flops_match_hand_count(image_size):
    out = summary.summarize("preact-resnet-8", num_classes=10, image_size=image_size)
    hand = _preact_resnet8_flops(image_size, 10)
    assert abs(out["flops"] / hand - 1) < 0.10, (out["flops"], hand)
    assert out["params"] == models.param_count(models.abstract_model("preact-resnet-8", 10))


def test_flops_scale_with_pixels_and_params_with_classes():
    small = summary.summarize("wrn-10-2", 10, 16)
    big = summary.summarize("wrn-10-2", 10, 32)
    # 4x the pixels; a bit more than 4x the FLOPs since fewer taps fall on the padding.
    assert 4.0 < big["flops"] / small["flops"] < 4.6
    assert big["params"] == small["params"]
    more = summary.summarize("wrn-10-2", 20, 16)
    assert more["params"] - small["params"] == 10 * (128 + 1)  # 10 more classes: 128 in + 1 bias


def test_bad_inputs():
    with pytest.raises(ValueError, match="image_size"):
        summary.summarize("wrn-10-1", 10, 0)
    with pytest.raises(ValueError, match="'resnet-50'"):
        summary.summarize("resnet-50", 10, 32)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "banjax.summary", *args], capture_output=True, text=True, timeout=120
    )


def test_cli():
    ok = _cli("preact-resnet-8", "--num-classes", "10", "--image-size", "8")
    assert ok.returncode == 0, ok.stderr
    out = summary.summarize("preact-resnet-8", 10, 8)
    assert f"{out['params']:,}" in ok.stdout and f"{out['flops']:,.0f}" in ok.stdout
    bad = _cli("wrn-27-10")
    assert bad.returncode != 0 and "'wrn-27-10'" in bad.stderr
