"""`make demo`'s command end to end on the built-in sample: it must keep working as the index format changes."""

from __future__ import annotations

from typer.testing import CliRunner

from provenance.cli import app


def test_demo_indexes_searches_and_scans_the_sample(tmp_path):
    report = tmp_path / "out" / "demo-report.html"
    result = CliRunner().invoke(app, ["demo", "--index", str(tmp_path / "sample"), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "FAISS" in result.output  # the plan line of each descriptor
    assert "replica" in result.output and "error" in result.output  # edited copies found, the corrupt file named
    html = report.read_text(encoding="utf-8")
    assert "<html" in html.lower() and "corrupt" in html
