"""The corpus report: its document and token counts match the shards."""

from __future__ import annotations

import json
import re


def test_report_token_counts_match_the_shards(built):
    out, _ = built
    for lang in ("de", "zh"):
        index = json.loads((out / "shards" / lang / "index.json").read_text())
        shard_tokens = index["train"]["tokens"] + index["valid"]["tokens"]
        docs = index["train"]["documents"] + index["valid"]["documents"]
        row = re.search(rf"^\| {lang} \| [\d.]+ \| (\d+) \| ([\d,]+) \|", (out / "report.md").read_text(), re.M)
        assert int(row.group(1)) == docs
        assert int(row.group(2).replace(",", "")) == shard_tokens  # the report counts the shards' tokens
