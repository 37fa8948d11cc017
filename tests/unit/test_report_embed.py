"""`fedumm report --update`: the report replaces the marked block of a document."""

from __future__ import annotations

import pytest

from fedumm.errors import DataError
from fedumm.report import BEGIN_MARK, END_MARK, embed_report


def test_embed_replaces_only_the_marked_block(tmp_path):
    report = tmp_path / "runs" / "report" / "report.md"
    report.parent.mkdir(parents=True)
    report.write_text("# fedumm report\n\n## Table\n\n| a |\n\n![curve](curves-fedavg.png)\n")
    doc = tmp_path / "docs" / "RESULTS.md"
    doc.parent.mkdir()
    doc.write_text(f"# Results\n\nintro\n\n{BEGIN_MARK}\nold\n{END_MARK}\n\nafter\n")
    embed_report(report, doc)
    text = doc.read_text()
    assert text.startswith("# Results\n\nintro\n\n") and text.endswith(f"{END_MARK}\n\nafter\n")
    assert "old" not in text and "## fedumm report" in text and "### Table" in text
    assert "![curve](../runs/report/curves-fedavg.png)" in text
    embed_report(report, doc)  # idempotent
    assert doc.read_text() == text


def test_embed_needs_the_markers(tmp_path):
    report = tmp_path / "report.md"
    report.write_text("# r\n")
    doc = tmp_path / "doc.md"
    doc.write_text("no markers\n")
    with pytest.raises(DataError, match="report: begin"):
        embed_report(report, doc)
    assert doc.read_text() == "no markers\n"
