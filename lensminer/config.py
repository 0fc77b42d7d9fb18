"""Typed configuration of a LensMiner run.

Defaults live in code. A YAML file overrides them, and command-line options override the file:
``load_config("run.yaml", {"download.concurrency": 16})``. Every store location is an fsspec URL,
so a local path and ``s3://bucket/prefix`` are handled the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lensminer.exceptions import ConfigError

__all__ = [
    "AugmentConfig",
    "BrickConfig",
    "DownloadConfig",
    "EmbedConfig",
    "LensMinerConfig",
    "PretrainConfig",
    "ScoreConfig",
    "SimilarityConfig",
    "StorageConfig",
    "SurveyConfig",
    "load_config",
]

PUBLIC_CUTOUT_URL = "https://www.legacysurvey.org/viewer/"
PUBLIC_DR9_SOUTH_URL = "https://portal.nersc.gov/cfs/cosmo/data/legacysurvey/dr9/south"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SurveyConfig(_Section):
    """Cutout service, survey layer and the shape of each cutout."""

    base_url: str = Field(PUBLIC_CUTOUT_URL, description="Cutout service base URL.")
    layer: str = Field("ls-dr9", description="Survey layer, e.g. ls-dr9 or ls-dr10.")
    bands: str = Field("grz", description="Bands in order, one character each.")
    size: int = Field(152, ge=8, le=3000, description="Cutout side in pixels.")
    pixscale: float = Field(0.262, gt=0, description="Pixel scale in arcsec per pixel.")
    image_format: Literal["fits", "jpeg"] = Field(
        "fits", description="fits: float32 nanomaggies; jpeg: uint8 RGB."
    )
    invvar: bool = Field(
        False,
        description="Also store inverse-variance planes, nanomaggies^-2 per band (FITS only).",
    )
    maskbits: bool = Field(
        False, description="Also store the int32 maskbits plane of the coadds (FITS only)."
    )


class DownloadConfig(_Section):
    """Request, retry and shard settings of the download stage."""

    source: Literal["service", "bricks"] = Field(
        "service",
        description="service: one request per target to the cutout service; "
        "bricks: cut from the brick coadds.",
    )

    concurrency: int = Field(8, ge=1, le=256, description="Requests in flight at once.")
    rate_limit: float = Field(10.0, gt=0, description="Maximum requests per second.")
    timeout: float = Field(60.0, gt=0, description="Per-request timeout in seconds.")
    max_retries: int = Field(5, ge=0, description="Retries of a transient failure.")
    backoff: float = Field(
        1.0, ge=0, description="First retry delay in seconds; doubles each retry."
    )
    max_backoff: float = Field(60.0, ge=0, description="Largest retry delay in seconds.")
    shard_rows: int = Field(
        256, ge=1, description="Rows per Zarr shard, the unit of work and writing."
    )
    chunk_rows: int = Field(16, ge=1, description="Rows per Zarr chunk inside a shard.")


class AugmentConfig(_Section):
    """Augmentation parameters; the defaults are the values of Stein et al. (2022)."""

    reddening_coefficients: tuple[float, ...] = (3.214, 2.165, 1.211)
    ebv_new_range: tuple[float, float] = (0.0, 1.0)
    flip_probability: float = Field(0.5, ge=0, le=1)
    rotate: bool = True
    scale_range: tuple[float, float] = (0.9, 1.1)
    psf_sigma_target_ranges: tuple[tuple[float, float], ...] = (
        (1.323, 5.0),
        (1.267, 4.5),
        (1.213, 4.25),
    )
    default_psf_fwhm: tuple[float, ...] = Field(
        (1.3, 1.2, 1.1), description="PSF FWHM in arcsec per band when the catalog has none."
    )
    crop_size: int = Field(96, ge=8, description="Side of the jitter crop in pixels.")
    jitter: int = Field(7, ge=0, description="Largest shift of the crop centre in pixels.")
    noise_sigma_ranges: tuple[tuple[float, float], ...] = (
        (0.001094, 0.013),
        (0.001094, 0.018),
        (0.001094, 0.061),
    )
    rgb_scales: tuple[float, ...] = Field((6.0, 3.4, 2.2), description="Viewer scales for g, r, z.")
    rgb_offset: float = 0.03
    rgb_q: float = 20.0
    default_ebv: float = Field(
        0.0, ge=0, description="E(B-V) in magnitudes assumed when the catalog has none."
    )
    padding_mode: Literal["reflection", "zeros", "border"] = Field(
        "reflection", description="How rotation and scaling fill pixels from outside the cutout."
    )
    noise_border: int = Field(
        8, ge=1, description="Width in pixels of the border used to estimate image noise."
    )
    # NOTE: a LensMiner choice, not from Stein et al. (2022), which trained on FITS cutouts only.
    jpeg_noise_sigma_range: tuple[float, float] = Field(
        (0.0, 0.02),
        description="Target noise sigma of JPEG views, in units of the [0, 1] pixel range.",
    )


class PretrainConfig(_Section):
    """MoCo v2 pretraining."""

    backbone: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"
    small_stem: bool = Field(
        False,
        description="Stride-1 conv1 and no max-pool for 96 px inputs; "
        "about 16 times the compute of the standard stem.",
    )
    projection_dim: int = Field(128, ge=1)
    queue_size: int = Field(4096, ge=1, description="Negatives in the MoCo queue.")
    temperature: float = Field(0.2, gt=0)
    momentum: float = Field(0.996, ge=0, le=1, description="EMA momentum of the key encoder.")
    batch_size: int = Field(64, ge=2)
    epochs: int = Field(2, ge=1)
    max_steps: int = Field(-1, description="Stop after this many steps; -1 means run all epochs.")
    learning_rate: float = Field(0.03, gt=0)
    warmup_epochs: float = Field(0.0, ge=0)
    weight_decay: float = Field(1e-4, ge=0)
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    accelerator: str = Field("auto", description="Lightning accelerator: auto, cpu or gpu.")
    devices: int | str = "auto"
    # ddp_spawn and ddp_fork are excluded. Their ranks copy a dataset built before the rank is
    # known, and the calling process gets neither the step count nor the loss history back.
    strategy: Literal["auto", "ddp"] = Field(
        "auto",
        description="Lightning strategy. ddp starts one process per device by running the "
        "command again for each further rank.",
    )
    # Mixed precision only, because "bf16-true" and "16-true" cast the weights and the queue.
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = Field(
        "auto",
        description="Lightning precision. auto is bf16-mixed on a GPU and 32-true on a CPU, "
        "and 16-mixed needs a GPU.",
    )
    seed: int = 0
    shuffle_bn_splits: int = Field(
        2,
        ge=1,
        description="On one device, key-encoder sub-batches that emulate shuffle-BN; "
        "1 turns it off.",
    )
    knn_k: int = Field(20, ge=1, description="Neighbours of the per-epoch k-NN monitor.")
    knn_max_rows: int = Field(
        2000, ge=2, description="Labelled rows the k-NN monitor reads at most."
    )
    magnitude_column: str | None = Field(
        "mag_z",
        description="Cutout-store array to sample uniformly in; "
        "absent or None samples rows uniformly.",
    )
    shuffle_shards: int = Field(
        2, ge=1, description="Shards whose rows are shuffled together in each worker."
    )
    checkpoint_every_n_steps: int = Field(
        0,
        ge=0,
        description="Also write last.ckpt every this many steps; "
        "0 saves only after epochs and at max_steps.",
    )


class EmbedConfig(_Section):
    """Embedding with Dask into Zarr."""

    batch_size: int = Field(128, ge=1)
    dtype: Literal["float32", "float16"] = "float32"
    scheduler: str = Field(
        "local",
        description="'local' for a LocalCluster, 'synchronous', 'cluster' for cluster_class, "
        "or a scheduler address tcp://host:port.",
    )
    n_workers: int = Field(2, ge=1, description="Workers of the LocalCluster.")
    threads_per_worker: int = Field(1, ge=1)
    processes: bool = Field(
        True, description="LocalCluster workers are processes (True) or threads of this process."
    )
    cluster_class: str | None = Field(
        None,
        description="Dotted path of a Dask cluster class for scheduler='cluster', "
        "e.g. dask_jobqueue.SLURMCluster.",
    )
    cluster_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of cluster_class."
    )
    adapt: dict[str, Any] | None = Field(
        None, description="cluster.adapt() arguments, e.g. {minimum: 1, maximum: 20}."
    )
    device: str = Field("auto", description="torch device: auto, cpu or cuda.")


class ScoreConfig(_Section):
    """Linear probe and candidate ranking."""

    label_column: str = Field(
        "label",
        description="Column of the target table with 0/1 labels; -1 or blank means unlabelled.",
    )
    test_fraction: float = Field(
        0.3, gt=0, lt=1, description="Share of labelled rows held out for metrics."
    )
    epochs: int = Field(300, ge=1)
    learning_rate: float = Field(0.01, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    top_k: int = Field(
        100,
        ge=1,
        description="Rows in the candidate table's highlighted top and the precision-at-k metric.",
    )
    grid_size: int = Field(36, ge=1, description="Cutouts in the PNG grid of top candidates.")
    seed: int = 0


class SimilarityConfig(_Section):
    """faiss similarity index."""

    embedding: Literal["representation", "projection"] = "representation"
    k: int = Field(10, ge=1)


class StorageConfig(_Section):
    """fsspec options, e.g. ``{"client_kwargs": {"endpoint_url": ...}}`` for s3://."""

    options: dict[str, Any] = Field(default_factory=dict)


class BrickConfig(_Section):
    """Brick mode: cut cutouts from the survey's brick coadds instead of the cutout service."""

    root: str = Field(
        PUBLIC_DR9_SOUTH_URL,
        description="fsspec URL of the data-release directory that contains coadd/ "
        "(HTTP, local mirror or s3://).",
    )
    bricks_table: str | None = Field(
        None,
        description="fsspec URL of survey-bricks.fits(.gz); None uses the computed brick grid.",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for root and bricks_table."
    )
    workers: int = Field(
        2, ge=1, le=64, description="Shards cut at once, each holding its bricks in memory."
    )


class LensMinerConfig(_Section):
    """The whole configuration of one run."""

    run_dir: str = Field("runs/default", description="fsspec URL of the run directory.")
    targets: str | None = Field(
        None, description="fsspec URL of the target table (CSV, TSV, FITS, Parquet)."
    )
    survey: SurveyConfig = Field(default_factory=SurveyConfig)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    similarity: SimilarityConfig = Field(default_factory=SimilarityConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    bricks: BrickConfig = Field(default_factory=BrickConfig)

    @field_validator("run_dir")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/") or value

    def url(self, name: str) -> str:
        """Return the URL of ``name`` inside the run directory."""
        return f"{self.run_dir}/{name}"

    @property
    def cutouts_url(self) -> str:
        return self.url("cutouts.zarr")

    @property
    def embeddings_url(self) -> str:
        return self.url("embeddings.zarr")

    @property
    def encoder_url(self) -> str:
        return self.url("encoder.pt")


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted!r}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> LensMinerConfig:
    """Build a configuration from defaults, an optional YAML file and dotted overrides.

    Parameters
    ----------
    path
        fsspec URL or path of a YAML file whose keys mirror :class:`LensMinerConfig`.
    overrides
        Mapping of dotted keys (``"pretrain.epochs"``) to values, applied last. ``None`` values are
        skipped, so unset command-line options leave the file and defaults alone.

    Raises
    ------
    ConfigError
        If the file cannot be read, is not a YAML mapping, or a value fails validation.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with fsspec.open(str(path), "r") as handle:
                loaded = yaml.safe_load(handle)
        except FileNotFoundError as error:
            raise ConfigError(
                f"configuration file {str(path)!r} not found; check the path"
            ) from error
        except yaml.YAMLError as error:
            raise ConfigError(
                f"configuration file {str(path)!r} is not valid YAML: {error}"
            ) from error
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"configuration file {str(path)!r} must contain a mapping of sections, "
                f"got {type(loaded).__name__}"
            )
        data = loaded or {}

    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, dotted, value)

    try:
        return LensMinerConfig.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(_describe(detail) for detail in error.errors())
        raise ConfigError(f"invalid configuration: {problems}") from error


def _describe(detail: Any) -> str:
    """Render one pydantic error as ``key = value: message``, with the valid keys for a typo."""
    key = ".".join(str(part) for part in detail["loc"])
    if detail["type"] == "extra_forbidden":
        section: type[BaseModel] = LensMinerConfig
        for part in detail["loc"][:-1]:
            annotation = section.model_fields[str(part)].annotation
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                break
            section = annotation
        valid = ", ".join(sorted(section.model_fields))
        return f"{key} is not a configuration key; valid keys here are: {valid}"
    return f"{key} = {detail.get('input')!r}: {detail['msg']}"
