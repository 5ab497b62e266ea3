"""Commands that format results for the terminal: `palmkit info`'s parameters and FLOPs."""

from palmkit.apps.commands import describe
from palmkit.model.palm import preset


def test_describe_prints_flops():
    text = describe("palm-8b")
    cfg = preset("palm-8b")
    assert "8,632,012,800" in text
    assert f"{6 * cfg.num_params() + 12 * 32 * 4096 * 2048:.4g}" in text
