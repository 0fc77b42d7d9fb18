"""Tests of the run report that the parent flow publishes."""

from __future__ import annotations

from lensminer.tasks._common import as_record
from lensminer.tasks.report import summary_markdown

SUMMARY = {
    "run_dir": "s3://bucket/run",
    "download": {
        "store_url": "s3://bucket/run/cutouts.zarr",
        "counts": {"OK": 8, "FAILED": 2},
        "top_failures": [["HTTP 404 from the service", 2]],
    },
    "pretrain": {"encoder_url": "s3://bucket/run/encoder.pt", "steps": 12},
    "embed": {"embeddings_url": "s3://bucket/run/embeddings.zarr", "n_valid": 8, "n_rows": 10},
    "score": {
        "candidates_url": "s3://bucket/run/candidates.csv",
        "n_scored": 8,
        "metrics": {"roc_auc": 0.9},
    },
    "index_url": "s3://bucket/run/similarity.faiss",
    "n_indexed": 8,
}


def test_markdown_names_every_output():
    text = summary_markdown(SUMMARY)
    for url in (
        "cutouts.zarr",
        "encoder.pt",
        "embeddings.zarr",
        "candidates.csv",
        "similarity.faiss",
    ):
        assert url in text


def test_markdown_lists_failures_and_metrics():
    text = summary_markdown(SUMMARY)
    assert "- 2 × HTTP 404 from the service" in text
    assert "- roc_auc: 0.9" in text


def test_markdown_without_failures_has_no_section():
    summary = {**SUMMARY, "download": {**SUMMARY["download"], "top_failures": []}}
    assert "Commonest download failures" not in summary_markdown(summary)


def test_as_record_makes_json_values():
    from dataclasses import dataclass

    @dataclass
    class Result:
        pairs: list[tuple[str, int]]
        path: object

    record = as_record(Result([("a", 1)], object()))
    assert record["pairs"] == [["a", 1]]
    assert isinstance(record["path"], str)
