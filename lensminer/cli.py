"""The ``lensminer`` command: one subcommand per stage, ``run`` for the whole chain."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table as RichTable

from lensminer.config import LensMinerConfig, load_config
from lensminer.exceptions import LensMinerError

app = typer.Typer(
    name="lensminer",
    help="Mine sky surveys for strong gravitational lenses with self-supervised learning.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console()
error_console = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="YAML file of configuration values (sections as in LensMinerConfig)."
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override one value, e.g. --set pretrain.epochs=5; repeatable, values parsed as YAML.",
    ),
]
RunDirOption = Annotated[
    str | None,
    typer.Option(
        "--run-dir", help="Run directory: a local path or fsspec URL such as s3://bucket/run."
    ),
]


def _parse_sets(values: list[str] | None) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(
                f"expected KEY=VALUE such as pretrain.epochs=5, got {item!r}", param_hint="--set"
            )
        overrides[key.strip()] = yaml.safe_load(raw)
    return overrides


def _config(config: Path | None, sets: list[str] | None, **named: Any) -> LensMinerConfig:
    return load_config(config, {**named, **_parse_sets(sets)})


# Libraries whose INFO messages (one per HTTP request, cluster event or hardware probe) would
# drown the stage milestones; their warnings and errors still show.
_CHATTY_LIBRARIES = ("httpx", "httpcore", "distributed", "pytorch_lightning", "lightning", "faiss")


class _QuietLibraries(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        chatty = record.name.split(".", 1)[0] in _CHATTY_LIBRARIES
        return record.levelno >= logging.WARNING or not chatty


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        # A handler filter, because some libraries reset their logger's level when imported.
        for handler in logging.getLogger().handlers:
            handler.addFilter(_QuietLibraries())


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log DEBUG messages.")] = False,
) -> None:
    """Mine sky surveys for strong gravitational lenses with self-supervised learning."""
    _setup_logging(verbose)


@app.command()
def run(
    config: ConfigOption = None,
    sets: SetOption = None,
    targets: Annotated[
        str | None,
        typer.Option(help="Target table URL (CSV, TSV, FITS or Parquet) with ra/dec columns."),
    ] = None,
    run_dir: RunDirOption = None,
    survey_url: Annotated[
        str | None,
        typer.Option(help="Cutout service base URL (default: the public Legacy Survey viewer)."),
    ] = None,
    query_row: Annotated[
        int | None, typer.Option(help="Row of the similarity query (default: the top candidate).")
    ] = None,
) -> None:
    """Run the whole chain as a Prefect flow: download, pretrain, embed, score, index."""
    from lensminer.flows.pipeline import lens_search

    cfg = _config(config, sets, targets=targets, run_dir=run_dir, **{"survey.base_url": survey_url})
    summary = lens_search(cfg, query_row=query_row)
    console.print(f"[bold]Finished.[/bold] Summary: {cfg.url('summary.json')}")
    console.print(summary["score"]["metrics"])


@app.command()
def download(
    config: ConfigOption = None,
    sets: SetOption = None,
    targets: Annotated[
        str | None, typer.Option(help="Target table URL (CSV, TSV, FITS or Parquet).")
    ] = None,
    run_dir: RunDirOption = None,
    survey_url: Annotated[str | None, typer.Option(help="Cutout service base URL.")] = None,
) -> None:
    """Download cutouts of every target into RUN_DIR/cutouts.zarr (resumable)."""
    from lensminer.download import download_cutouts
    from lensminer.targets import read_targets

    cfg = _config(config, sets, targets=targets, run_dir=run_dir, **{"survey.base_url": survey_url})
    if not cfg.targets:
        raise typer.BadParameter(
            "give the target table with --targets or in the configuration file",
            param_hint="--targets",
        )
    options = cfg.storage.options or None
    table = read_targets(cfg.targets, storage_options=options, label_column=cfg.score.label_column)

    columns = [
        TextColumn("[bold]download"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("download", total=len(table), rate="")

        def update(done: int, total: int) -> None:
            elapsed = progress.tasks[bar].elapsed or 0.0
            rate = f"{done / elapsed:.1f} cutouts/s" if elapsed > 0 else ""
            progress.update(bar, completed=done, total=total, rate=rate)

        summary = download_cutouts(
            table,
            cfg.cutouts_url,
            cfg.survey,
            cfg.download,
            storage_options=options,
            progress=update,
        )
    console.print(f"Cutout store: {summary.store_url}")
    console.print(f"Rows by status: {summary.counts}")
    for reason, count in summary.top_failures:
        console.print(f"  {count} × {reason}")


@app.command()
def pretrain(
    config: ConfigOption = None,
    sets: SetOption = None,
    run_dir: RunDirOption = None,
    fresh: Annotated[
        bool,
        typer.Option(
            "--fresh",
            help="Start a new run and overwrite RUN_DIR/checkpoints/last.ckpt instead of "
            "resuming from it.",
        ),
    ] = False,
) -> None:
    """Pretrain the MoCo v2 encoder on RUN_DIR/cutouts.zarr; writes RUN_DIR/encoder.pt.

    A rerun resumes from RUN_DIR/checkpoints/last.ckpt when it exists.
    """
    from pytorch_lightning.utilities import rank_zero_only

    from lensminer.pretrain import pretrain as run_pretrain

    cfg = _config(config, sets, run_dir=run_dir)
    result = run_pretrain(
        cfg.cutouts_url,
        cfg.run_dir,
        cfg.pretrain,
        cfg.augment,
        storage_options=cfg.storage.options or None,
        resume=not fresh,
    )
    # Under DDP every rank runs this command; only rank 0 reports.
    if rank_zero_only.rank == 0:
        console.print(f"Encoder: {result.encoder_url} after {result.steps} steps")


@app.command()
def embed(
    config: ConfigOption = None, sets: SetOption = None, run_dir: RunDirOption = None
) -> None:
    """Embed every cutout with Dask into RUN_DIR/embeddings.zarr (resumable)."""
    from lensminer.embed import embed_cutouts

    cfg = _config(config, sets, run_dir=run_dir)
    summary = embed_cutouts(
        cfg.cutouts_url,
        cfg.encoder_url,
        cfg.embeddings_url,
        cfg.embed,
        cfg.augment,
        storage_options=cfg.storage.options or None,
    )
    console.print(
        f"Embeddings: {summary.embeddings_url} ({summary.n_valid} valid of {summary.n_rows} rows)"
    )


@app.command()
def score(
    config: ConfigOption = None, sets: SetOption = None, run_dir: RunDirOption = None
) -> None:
    """Train the linear probe on labelled rows and rank every object; writes candidates.csv."""
    from lensminer.score import score_embeddings

    cfg = _config(config, sets, run_dir=run_dir)
    result = score_embeddings(
        cfg.cutouts_url,
        cfg.embeddings_url,
        cfg.run_dir,
        cfg.score,
        embedding=cfg.similarity.embedding,
        storage_options=cfg.storage.options or None,
    )
    console.print(
        f"Candidates: {result.candidates_url}\nGrid: {result.grid_url}\nMetrics: {result.metrics}"
    )


@app.command()
def index(
    config: ConfigOption = None, sets: SetOption = None, run_dir: RunDirOption = None
) -> None:
    """Build the faiss similarity index RUN_DIR/similarity.faiss."""
    from lensminer.similarity import build_index

    cfg = _config(config, sets, run_dir=run_dir)
    count = build_index(
        cfg.embeddings_url,
        cfg.url("similarity.faiss"),
        cfg.similarity,
        storage_options=cfg.storage.options or None,
    )
    console.print(f"Indexed {count} rows into {cfg.url('similarity.faiss')}")


@app.command()
def similar(
    config: ConfigOption = None,
    sets: SetOption = None,
    run_dir: RunDirOption = None,
    row: Annotated[
        int | None, typer.Option(help="Row number of the query object in the cutout store.")
    ] = None,
    ra: Annotated[
        float | None, typer.Option(help="Right ascension of the query in degrees (with --dec).")
    ] = None,
    dec: Annotated[
        float | None, typer.Option(help="Declination of the query in degrees (with --ra).")
    ] = None,
    k: Annotated[int, typer.Option("-k", help="Number of similar objects to print.")] = 10,
) -> None:
    """Print the K objects most similar to one query object (by row or by RA/Dec)."""
    from lensminer.similarity import find_similar

    if (row is None) == (ra is None or dec is None):
        raise typer.BadParameter(
            "give either --row, or both --ra and --dec", param_hint="--row/--ra/--dec"
        )
    cfg = _config(config, sets, run_dir=run_dir)
    table = find_similar(
        cfg.url("similarity.faiss"),
        cfg.embeddings_url,
        cfg.cutouts_url,
        row=row,
        ra=ra,
        dec=dec,
        k=k,
        storage_options=cfg.storage.options or None,
    )
    view = RichTable(title=f"{len(table)} most similar objects")
    for name in table.colnames:
        view.add_column(name)
    for record in table:
        view.add_row(
            *(f"{value:.6f}" if isinstance(value, float) else str(value) for value in record)
        )
    console.print(view)


@app.command()
def serve(
    arguments: Annotated[
        list[str] | None,
        typer.Argument(help="Options of the survey server; see `lensminer serve -- --help`."),
    ] = None,
) -> None:
    """Run the local Legacy Survey cutout server (simulated sky or a folder of real images)."""
    from lensminer.infra.survey_server import main as serve_main

    raise typer.Exit(serve_main(arguments or []))


@app.command()
def demo(
    run_dir: Annotated[
        str, typer.Option(help="Local directory for the demo's outputs.")
    ] = "runs/demo",
    n_targets: Annotated[int, typer.Option(help="Number of simulated galaxies.")] = 2000,
    lens_fraction: Annotated[
        float, typer.Option(help="Share of simulated galaxies that are strong lenses.")
    ] = 0.05,
    seed: Annotated[int, typer.Option(help="Seed of the simulated sky.")] = 0,
    sets: SetOption = None,
) -> None:
    """Run the whole chain offline on a simulated sky with injected lenses."""
    from lensminer.demo import run_simulated_demo

    result = run_simulated_demo(
        run_dir, n_targets, lens_fraction, seed, overrides=_parse_sets(sets)
    )
    _print_demo(result, "injected lenses")


@app.command("demo-images")
def demo_images(
    images: Annotated[
        Path, typer.Option(help="Folder of PNG/JPEG cutouts.", exists=True, file_okay=False)
    ],
    catalog: Annotated[
        Path,
        typer.Option(
            help="CSV naming each image and its position (iauname or ra/dec) and label.",
            exists=True,
            dir_okay=False,
        ),
    ],
    label: Annotated[
        str, typer.Option(help="0/1 column of the catalog that the probe learns.")
    ] = "ring",
    run_dir: Annotated[str, typer.Option(help="Local directory for the outputs.")] = "runs/images",
    sets: SetOption = None,
) -> None:
    """Run the whole chain on a folder of real colour cutouts served by the local survey server."""
    from lensminer.demo import run_image_folder_demo

    result = run_image_folder_demo(
        str(images), str(catalog), label, run_dir, overrides=_parse_sets(sets)
    )
    _print_demo(result, f"held-out '{label}' objects")


@app.command()
def web(
    config: ConfigOption = None,
    sets: SetOption = None,
    run_dir: RunDirOption = None,
    host: Annotated[
        str, typer.Option(help="Interface to listen on; 127.0.0.1 keeps the page on this machine.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port to listen on.", min=1, max=65535)] = 8050,
) -> None:
    """Serve the similarity-search web page over RUN_DIR; needs `lensminer index` first."""
    import uvicorn

    from lensminer.web import create_web_app

    cfg = _config(config, sets, run_dir=run_dir)
    web_app = create_web_app(cfg)
    console.print(f"Similarity search over {cfg.run_dir} at http://{host}:{port}/ (Ctrl+C stops)")
    uvicorn.run(web_app, host=host, port=port, log_level="info")


def _print_demo(result: Any, subject: str) -> None:
    metrics = result.summary["score"]["metrics"]
    console.print("[bold]LensMiner run finished.[/bold] Outputs:")
    for name, url in result.outputs.items():
        console.print(f"  {name:<11} {url}")
    console.print(f"ROC AUC on the held-out split: {metrics['roc_auc']:.3f}")
    console.print(
        f"{result.n_test_lenses_in_top} of {result.n_test_lenses} {subject} rank in the top "
        f"{result.top_fraction:.0%} of the held-out rows"
    )
    neighbours = result.summary.get("neighbours") or []
    console.print(
        f"Similarity query (row {result.summary.get('query_row')}): "
        + ", ".join(f"{n['target_id']} ({n['similarity']:.3f})" for n in neighbours[:5])
    )


def entrypoint() -> None:
    """Run the CLI and turn LensMiner errors into a one-line message and exit code 1."""
    try:
        app()
    except LensMinerError as error:
        error_console.print(f"[red]error:[/red] {error}")
        raise SystemExit(1) from error
