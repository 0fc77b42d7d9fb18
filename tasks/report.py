"""Prefect task that publishes the run's summary as artifacts."""

from __future__ import annotations

from typing import Any

import fsspec
from astropy.table import Table
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from lensminer import storage

__all__ = ["publish_report_task", "summary_markdown"]

_TABLE_COLUMNS = ("rank", "target_id", "ra", "dec", "score", "label", "split", "viewer")


def summary_markdown(summary: dict[str, Any]) -> str:
    """Render the run summary (the parent flow's return value) as markdown."""
    download = summary["download"]
    pretrain, embed, score = summary["pretrain"], summary["embed"], summary["score"]
    metrics = score["metrics"]
    lines = [
        "# LensMiner run",
        "",
        f"Run directory: `{summary['run_dir']}`",
        "",
        "| stage | output | numbers |",
        "|---|---|---|",
        f"| download | `{download['store_url']}` | rows by status: {download['counts']} |",
        f"| pretrain | `{pretrain['encoder_url']}` | steps: {pretrain['steps']} |",
        f"| embed | `{embed['embeddings_url']}` | valid: {embed['n_valid']}/{embed['n_rows']} |",
        f"| score | `{score['candidates_url']}` | rows ranked: {score['n_scored']} |",
        f"| similarity | `{summary['index_url']}` | rows indexed: {summary['n_indexed']} |",
        "",
        "## Metrics on the held-out split",
        "",
        *(f"- {name}: {value}" for name, value in metrics.items()),
    ]
    failures = download.get("top_failures") or []
    if failures:
        lines += [
            "",
            "## Commonest download failures",
            "",
            *(f"- {count} × {reason}" for reason, count in failures),
        ]
    return "\n".join(lines)


@task(name="publish-report", cache_policy=NO_CACHE)
def publish_report_task(
    summary: dict[str, Any],
    summary_url: str,
    top: int = 25,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Write the run summary as JSON and publish it with the top candidates as Prefect artifacts."""
    storage.write_json(summary_url, summary, storage_options)
    create_markdown_artifact(
        summary_markdown(summary), key="lens-search-summary", description="LensMiner run summary"
    )

    with fsspec.open(summary["score"]["candidates_url"], "r", **(storage_options or {})) as handle:
        candidates = Table.read(handle.read(), format="ascii.csv")
    rows = [
        {
            name: candidates[name][i].item()
            if hasattr(candidates[name][i], "item")
            else candidates[name][i]
            for name in _TABLE_COLUMNS
            if name in candidates.colnames
        }
        for i in range(min(top, len(candidates)))
    ]
    create_table_artifact(
        rows, key="top-lens-candidates", description=f"Top {len(rows)} lens candidates"
    )
    get_run_logger().info(
        "wrote %s and published the top %d candidates as artifacts", summary_url, len(rows)
    )
