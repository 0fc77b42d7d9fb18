"""Tests of target table reading, validation and sample cuts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.table import Table

from lensminer.exceptions import TargetError
from lensminer.targets import (
    MASKBITS_BRIGHT_STAR,
    merge_close_targets,
    parse_iau_names,
    read_catalogs,
    read_lens_table,
    read_lenscat,
    read_targets,
    select_box,
    select_cone,
    select_parent_sample,
    standardize_targets,
)


def small_table() -> Table:
    return Table(
        {
            "ID": ["a", "b", "c"],
            "RA": [10.0, 359.5, 0.25],
            "DEC": [-5.0, 1.0, 89.0],
            "label": ["1", "", "0"],
            "EBV": [0.01, 0.02, 0.03],
            "PSFSIZE_G": [1.3, 1.4, 1.5],
        }
    )


# Reading each format ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".fits", ".parquet", ".ecsv.unknown"])
def test_read_targets_formats(tmp_path: Path, suffix: str) -> None:
    table = small_table()
    path = tmp_path / f"targets{suffix}"
    if suffix == ".tsv":
        table.write(path, format="ascii.tab")
    elif suffix == ".ecsv.unknown":
        table.write(path, format="ascii.csv")  # sniffed: no known extension
    elif suffix == ".parquet":
        table.write(path, format="parquet")
    else:
        table.write(path)

    targets = read_targets(str(path))

    assert targets["target_id"].tolist() == ["a", "b", "c"]
    assert targets["ra"].dtype == np.float64
    np.testing.assert_allclose(targets["dec"], [-5.0, 1.0, 89.0])
    assert targets["label"].tolist() == [1, -1, 0]
    assert targets["label"].dtype == np.int8
    np.testing.assert_allclose(targets["ebv"], [0.01, 0.02, 0.03], rtol=1e-6)
    assert "psfsize_g" in targets.colnames


def test_read_targets_fits_second_hdu(tmp_path: Path) -> None:
    from astropy.io import fits

    hdus = fits.HDUList([fits.PrimaryHDU(np.zeros((2, 2))), fits.BinTableHDU(small_table())])
    hdus.writeto(tmp_path / "t.fits")

    assert len(read_targets(str(tmp_path / "t.fits"))) == 3


def test_read_targets_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.csv"):
        read_targets(str(tmp_path / "nothing.csv"))


def test_read_targets_gz_decals(shared_data: Path) -> None:
    targets = read_targets(str(shared_data / "gz-decals" / "catalog.csv"), label_column="ring")

    assert len(targets) == 370
    assert targets["target_id"][0] == "J000411.19+020924.0"
    # J000411.19+020924.0: RA 00h04m11.19s = 1.046625 deg, Dec +02d09m24.0s = 2.156667 deg.
    assert targets["ra"][0] == pytest.approx(1.046625, abs=1e-9)
    assert targets["dec"][0] == pytest.approx(2.0 + 9 / 60 + 24 / 3600, abs=1e-9)
    assert set(targets["label"].tolist()) == {0, 1}


def test_read_lens_table_training(shared_data: Path) -> None:
    targets = read_lens_table(str(shared_data / "lenses" / "training_lenses.tsv"))

    assert len(targets) == 1615
    assert (targets["label"] == 1).all()
    assert "ebv" in targets.colnames
    assert targets["target_id"][0] == "J017.48153+04.16063"


def test_read_lens_table_merges_repeats(shared_data: Path) -> None:
    targets = read_lens_table(str(shared_data / "lenses" / "new_lenses.tsv"))

    assert 1185 <= len(targets) < 1192
    assert set(targets["grade"].tolist()) <= {"A", "B"}
    with pytest.raises(TargetError, match="repeated target ids"):
        read_lens_table(str(shared_data / "lenses" / "new_lenses.tsv"), merge_radius_arcsec=None)


def test_read_sweep_parent_sample(shared_data: Path) -> None:
    paths = sorted(str(path) for path in (shared_data / "sweep").glob("*.fits"))
    catalog = read_catalogs(paths)

    sample = select_parent_sample(catalog)
    targets = standardize_targets(sample, label_column=None)

    assert len(catalog) == 36
    assert 0 < len(sample) < len(catalog)
    assert not any(kind.strip() == "PSF" for kind in sample["TYPE"].astype(str))
    assert targets["target_id"][0].count("-") == 2  # release-brickid-objid


# Validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ra", "dec"), [(360.0, 0.0), (-1.0, 0.0), (10.0, 91.0), (np.nan, 0.0), (10.0, np.inf)]
)
def test_standardize_bad_coordinates(ra: float, dec: float) -> None:
    table = Table({"ra": [1.0, ra, 2.0], "dec": [0.0, dec, 0.0]})
    with pytest.raises(TargetError, match=r"1 row with invalid coordinates \(0-based row \[1\]"):
        standardize_targets(table)


def test_standardize_duplicate_ids() -> None:
    table = Table({"name": ["x", "y", "x"], "ra": [1.0, 2.0, 3.0], "dec": [0.0, 0.0, 0.0]})
    with pytest.raises(TargetError, match=r"repeated target ids \(first \['x'\]\)"):
        standardize_targets(table)


def test_standardize_bad_label() -> None:
    table = Table({"ra": [1.0, 2.0], "dec": [0.0, 0.0], "label": [1, 7]})
    with pytest.raises(TargetError, match="not 1, 0 or blank"):
        standardize_targets(table)


def test_standardize_missing_named_label() -> None:
    table = Table({"ra": [1.0], "dec": [0.0]})
    with pytest.raises(TargetError, match="'ring' not found"):
        standardize_targets(table, label_column="ring")


def test_standardize_default_label_optional() -> None:
    assert "label" not in standardize_targets(Table({"ra": [1.0], "dec": [0.0]})).colnames


def test_standardize_no_coordinates() -> None:
    with pytest.raises(TargetError, match="no coordinate columns"):
        standardize_targets(Table({"x": [1.0], "y": [0.0]}))


def test_standardize_masked_label() -> None:
    table = Table(
        {
            "ra": [1.0, 2.0],
            "dec": [0.0, 0.0],
            "label": np.ma.MaskedArray([1, 0], mask=[False, True]),
        }
    )
    assert standardize_targets(table)["label"].tolist() == [1, -1]


def test_standardize_coordinate_ids_stable() -> None:
    table = Table({"ra": [1.0, 200.123456789], "dec": [-0.5, 45.0]})
    assert standardize_targets(table)["target_id"].tolist() == [
        "J001.00000-00.50000",
        "J200.12346+45.00000",
    ]


def test_parse_iau_names_bad() -> None:
    with pytest.raises(TargetError, match="not IAU names"):
        parse_iau_names(["J000411.19+020924.0", "NGC 1234"])


def test_parse_iau_names_south() -> None:
    ra, dec = parse_iau_names(["J235959.99-890000.0"])
    assert ra[0] == pytest.approx(15 * (23 + 59 / 60 + 59.99 / 3600))
    assert dec[0] == pytest.approx(-89.0)


# Merging and cuts --------------------------------------------------------------------------


def test_merge_close_targets_keeps_first() -> None:
    offset = 0.2 / 3600  # 0.2 arcsec, inside one pixel
    table = Table(
        {
            "target_id": ["a", "b", "c", "d"],
            "ra": [10.0, 10.0 + offset, 20.0, 10.0 + 2 * offset],
            "dec": [0.0] * 4,
        }
    )

    merged = merge_close_targets(table)

    # b is within 0.262 arcsec of a; d is 0.4 arcsec from a but 0.2 from the dropped b, so it stays.
    assert merged["target_id"].tolist() == ["a", "c", "d"]


def test_merge_close_targets_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    table = Table({"ra": rng.uniform(0, 0.01, 200), "dec": rng.uniform(0, 0.01, 200)})
    coords = SkyCoord(table["ra"], table["dec"], unit="deg")

    merged = merge_close_targets(table, radius_arcsec=1.0)

    kept: list[int] = []
    for row in range(len(table)):
        if all(coords[row].separation(coords[other]).arcsec > 1.0 for other in kept):
            kept.append(row)
    # The greedy rule drops a row only when a kept earlier row is close, so it matches brute force.
    assert len(merged) == len(kept)
    np.testing.assert_array_equal(merged["ra"], table["ra"][kept])


def test_select_box_wraps_ra() -> None:
    table = Table({"RA": [355.0, 5.0, 180.0, 359.9], "DEC": [0.0, 0.0, 0.0, 20.0]})
    assert select_box(table, 350, 10, -10, 10)["RA"].tolist() == [355.0, 5.0]


def test_select_box_plain() -> None:
    table = Table({"ra": [355.0, 5.0, 180.0], "dec": [0.0, 0.0, 0.0]})
    assert select_box(table, 0, 200, -1, 1)["ra"].tolist() == [5.0, 180.0]


def test_select_cone_across_zero() -> None:
    table = Table({"ra": [359.9, 0.1, 1.0], "dec": [0.0, 0.0, 0.0]})
    assert select_cone(table, 0.0, 0.0, 0.2)["ra"].tolist() == [359.9, 0.1]


def test_select_parent_sample_cuts() -> None:
    # z = 22.5 - 2.5 log10(flux / transmission): flux 10 -> 20.0 (fails < 20), flux 40 -> 18.5.
    table = Table(
        {
            "flux_z": [40.0, 10.0, 40.0, 40.0, 40.0, -1.0],
            "mw_transmission_z": [1.0] * 6,
            "nobs_g": [1, 1, 0, 1, 1, 1],
            "nobs_r": [1] * 6,
            "nobs_z": [1] * 6,
            "type": ["SER", "SER", "SER", "PSF", "DEV", "SER"],
            "maskbits": [0, 0, 0, 0, MASKBITS_BRIGHT_STAR, 0],
        }
    )
    assert len(select_parent_sample(table)) == 2
    assert len(select_parent_sample(table, maskbits=MASKBITS_BRIGHT_STAR)) == 1
    assert len(select_parent_sample(table, exclude_psf=False, min_nobs=0)) == 4


def test_select_parent_sample_missing_column() -> None:
    with pytest.raises(TargetError, match="MW_TRANSMISSION_Z"):
        select_parent_sample(Table({"flux_z": [1.0]}))


def test_read_lenscat_missing_package() -> None:
    if importlib.util.find_spec("lenscat") is not None:
        pytest.skip("lenscat is installed, so the missing-package error cannot be raised")
    with pytest.raises(ImportError, match=r"lensminer\[lenscat\]"):
        read_lenscat()


LENSCAT_ROWS = """name,RA [deg],DEC [deg],zlens,type,grading,ref
J0011-0845,2.83435,-8.7643,-,galaxy,confident,https://example.org/a
J0013+5119,3.348077,51.3183,0.52,galaxy,probable,https://example.org/b
J0100-2000,15.0,-20.0,-,cluster,confident,https://example.org/c
"""


def test_read_lenscat_file_format(tmp_path: Path) -> None:
    path = tmp_path / "catalog.csv"
    path.write_text(LENSCAT_ROWS)
    targets = read_lenscat(str(path))
    assert targets["lens_name"].tolist() == ["J0011-0845", "J0013+5119", "J0100-2000"]
    np.testing.assert_allclose(targets["ra"], [2.83435, 3.348077, 15.0])
    np.testing.assert_allclose(targets["dec"], [-8.7643, 51.3183, -20.0])
    assert targets["label"].tolist() == [1, 1, 1]


def test_read_lenscat_grading(tmp_path: Path) -> None:
    path = tmp_path / "catalog.csv"
    path.write_text(LENSCAT_ROWS)
    targets = read_lenscat(str(path), grading=["confident"])
    assert targets["lens_name"].tolist() == ["J0011-0845", "J0100-2000"]


def test_read_lenscat_merges_repeats(tmp_path: Path) -> None:
    path = tmp_path / "catalog.csv"
    # The second row is the first lens again, 0.36 arcsec away, as listed by another paper.
    path.write_text(
        LENSCAT_ROWS + "J0011-0845b,2.8344,-8.76431,-,galaxy,probable,https://example.org/d\n"
    )
    targets = read_lenscat(str(path))
    assert len(targets) == 3
    assert len(set(targets["target_id"].tolist())) == 3


def test_read_lenscat_installed_package() -> None:
    if importlib.util.find_spec("lenscat") is None:
        pytest.skip("the optional lenscat package is not installed")
    targets = read_lenscat()
    assert len(targets) > 10_000
    assert np.all(targets["label"] == 1)
