"""metadata.csv: parsing, checks, error messages and the integer encoding of meta-label values."""
import pytest

from nnunet_contrastive.data.metadata import (
    METADATA_FILENAME,
    RESERVED_COLUMNS,
    MetadataError,
    read_metadata,
    validate_against_cases,
    value_counts,
    write_metadata,
)


def _write(tmp_path, text: str, name: str = METADATA_FILENAME, encoding: str = "utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return str(path)


ACDC_LIKE = {
    "patient001_frame01": {"patient": "patient001", "phase": "ED", "site": "A"},
    "patient001_frame12": {"patient": "patient001", "phase": "ES", "site": "A"},
    "patient002_frame01": {"patient": "patient002", "phase": "ED", "site": "B, annex"},  # needs quoting
    "patient002_frame09": {"patient": "patient002", "phase": "ES", "site": "B, annex"},
}


# ---------------------------------------------------------------------------------------------- round trip / format
def test_write_read_round_trip_file_and_folder(tmp_path):
    path = write_metadata(str(tmp_path), ACDC_LIKE)  # a folder: the file name is added
    assert path == str(tmp_path / METADATA_FILENAME)
    for source in (path, str(tmp_path)):
        table = read_metadata(source)
        assert table.columns == ["patient", "phase", "site"]
        assert table.rows == ACDC_LIKE
        assert table.cases == list(ACDC_LIKE)  # file order kept
        assert table.meta_label_columns == ["patient", "phase", "site"]  # no dataset.json: every column


def test_written_file_has_case_first_and_one_line_per_case(tmp_path):
    path = write_metadata(str(tmp_path / "m.csv"), {"b": {"x": 1}, "a": {"x": 2}})
    lines = open(path, encoding="utf-8").read().splitlines()
    assert lines == ["case,x", "b,1", "a,2"]  # values converted to str, case first


def test_write_with_explicit_column_order(tmp_path):
    path = write_metadata(str(tmp_path / "m.csv"), ACDC_LIKE, columns=["phase", "patient"])
    table = read_metadata(path)
    assert table.columns == ["phase", "patient"]
    assert table.rows["patient002_frame09"] == {"phase": "ES", "patient": "patient002"}


def test_case_must_be_first_column(tmp_path):
    path = _write(tmp_path, "patient,case\np1,c1\n")
    with pytest.raises(MetadataError) as e:
        read_metadata(path)
    assert "first header column must be 'case'" in str(e.value) and path in str(e.value)


def test_missing_file_says_how_to_create_it(tmp_path):
    with pytest.raises(MetadataError) as e:
        read_metadata(str(tmp_path))
    msg = str(e.value)
    assert METADATA_FILENAME in msg and "'case' column" in msg and "one row per case" in msg


def test_empty_file(tmp_path):
    with pytest.raises(MetadataError, match="empty.*header row starting with 'case'"):
        read_metadata(_write(tmp_path, ""))


def test_bom_blank_lines_and_whitespace_tolerated(tmp_path):
    text = "\ncase , patient,phase\r\n\r\nc1, p1 ,ED\r\n\n  \nc2,p1,ES\r\n\n\n"
    table = read_metadata(_write(tmp_path, text, encoding="utf-8-sig"))  # BOM, CRLF, blank lines, padding
    assert table.columns == ["patient", "phase"]
    assert table.rows == {"c1": {"patient": "p1", "phase": "ED"}, "c2": {"patient": "p1", "phase": "ES"}}


# ------------------------------------------------------------------------------------------------ table errors
def test_empty_value_names_case_and_column(tmp_path):
    path = _write(tmp_path, "case,patient,phase\nc1,p1,ED\nc2,p1,  \n")
    with pytest.raises(MetadataError) as e:
        read_metadata(path)
    msg = str(e.value)
    assert "'c2'" in msg and "'phase'" in msg and "Fill it in" in msg and "'c1'" not in msg


def test_empty_case_names_line(tmp_path):
    with pytest.raises(MetadataError, match=r"line 3: empty 'case'"):
        read_metadata(_write(tmp_path, "case,phase\nc1,ED\n ,ES\n"))


def test_duplicate_case_names_case_and_line(tmp_path):
    path = _write(tmp_path, "case,phase\nc1,ED\nc2,ES\nc1,ES\n")
    with pytest.raises(MetadataError) as e:
        read_metadata(path)
    msg = str(e.value)
    assert "line 4" in msg and "'c1'" in msg and "twice" in msg and "one row per case" in msg


@pytest.mark.parametrize("row, got", [("c2,p2", 2), ("c2,p2,ED,extra", 4)])
def test_wrong_field_count_names_the_line(tmp_path, row, got):
    path = _write(tmp_path, f"case,patient,phase\nc1,p1,ED\n{row}\nc3,p3,ES\n")
    with pytest.raises(MetadataError) as e:
        read_metadata(path)
    msg = str(e.value)
    assert "line 3" in msg and "expected 3 fields" in msg and f"got {got}" in msg
    assert "one value per header column" in msg


def test_wrong_field_count_line_number_counts_blank_lines(tmp_path):
    # the line number must be the file's, also when blank lines (tolerated) come before the bad row
    path = _write(tmp_path, "case,patient,phase\n\nc1,p1,ED\n\n\nc2,p2\n")
    with pytest.raises(MetadataError, match=r"line 6:"):
        read_metadata(path)


def test_mixed_number_and_text_column_is_named(tmp_path):
    path = _write(tmp_path, "case,phase,age\nc1,ED,61\nc2,ES,unknown\nc3,ED,70.5\n")
    with pytest.raises(MetadataError) as e:
        read_metadata(path)
    msg = str(e.value)
    assert "column 'age'" in msg and "'c2'='unknown'" in msg and "one type per column" in msg
    assert "'phase'" not in msg


def test_integers_and_floats_in_one_column_are_fine(tmp_path):
    table = read_metadata(_write(tmp_path, "case,dose\nc1,2\nc2,1.5\nc3,10\n"))
    # one numeric column: ranks follow numeric order 1.5 < 2 < 10
    assert table.encoded("dose") == {"c2": 0, "c1": 1, "c3": 2}


@pytest.mark.parametrize("column", RESERVED_COLUMNS)
def test_reserved_column_names(tmp_path, column):
    with pytest.raises(MetadataError) as e:
        read_metadata(_write(tmp_path, f"case,patient,{column}\nc1,p1,1\n"))
    msg = str(e.value)
    assert f"'{column}' is reserved" in msg and "rename it" in msg


def test_duplicate_and_unnamed_header_columns(tmp_path):
    with pytest.raises(MetadataError, match="'phase' appears twice in the header"):
        read_metadata(_write(tmp_path, "case,phase,phase\nc1,ED,ES\n"))
    with pytest.raises(MetadataError, match="header column 3 has no name"):
        read_metadata(_write(tmp_path, "case,phase,\nc1,ED,x\n"))


# ------------------------------------------------------------------------------------------ dataset.json meta_labels
def test_declared_meta_labels(tmp_path):
    write_metadata(str(tmp_path), ACDC_LIKE)
    table = read_metadata(str(tmp_path), {"meta_labels": ["phase"]})
    assert table.meta_label_columns == ["phase"]
    assert table.available_meta_labels() == ["patient", "phase"]  # patient is always available
    # 'patient' may be declared without a column: it defaults to the case id
    write_metadata(str(tmp_path / "m.csv"), {"c1": {"phase": "ED"}})
    assert read_metadata(str(tmp_path / "m.csv"), {"meta_labels": ["patient", "phase"]}).meta_label_columns == [
        "patient", "phase"]


def test_declared_meta_label_column_missing(tmp_path):
    write_metadata(str(tmp_path), ACDC_LIKE)
    with pytest.raises(MetadataError) as e:
        read_metadata(str(tmp_path), {"meta_labels": ["phase", "scanner"]})
    msg = str(e.value)
    assert "dataset.json" in msg and "'scanner'" in msg and METADATA_FILENAME in msg and "no such column" in msg
    with pytest.raises(MetadataError, match="must be a list of column names"):
        read_metadata(str(tmp_path), {"meta_labels": "phase"})


# ----------------------------------------------------------------------------------------------- values / encoding
def test_patient_defaults_to_case_id(tmp_path):
    write_metadata(str(tmp_path), {"c2": {"phase": "ES"}, "c1": {"phase": "ED"}})
    table = read_metadata(str(tmp_path))
    assert table.value("c1", "patient") == "c1" and table.value("c2", "patient") == "c2"
    assert table.available_meta_labels() == ["patient", "phase"]
    assert table.encoded("patient") == {"c1": 0, "c2": 1}


def test_value_errors_name_case_and_column(tmp_path):
    write_metadata(str(tmp_path), {"c1": {"phase": "ED"}})
    table = read_metadata(str(tmp_path))
    with pytest.raises(MetadataError, match=r"case 'nope' has no row\. Add a row"):
        table.value("nope", "phase")
    with pytest.raises(MetadataError, match=r"no column 'site'"):
        table.value("c1", "site")


def test_encoding_integer_column_is_numeric_order(tmp_path):
    values = {"a": "10", "b": "2", "c": "1", "d": "2", "e": "33"}
    write_metadata(str(tmp_path), {c: {"slice_count": v} for c, v in values.items()})
    table = read_metadata(str(tmp_path))
    enc = table.encoding("slice_count")
    # numeric reference: rank among the sorted distinct integers
    distinct = sorted({int(v) for v in values.values()})
    assert enc == {str(v): i for i, v in enumerate(distinct)}
    assert enc["2"] < enc["10"]  # string order would put "10" first


def test_encoding_text_column_is_string_order(tmp_path):
    values = {"a": "site10", "b": "site2", "c": "Site1", "d": "site2"}
    write_metadata(str(tmp_path), {c: {"site": v} for c, v in values.items()})
    enc = read_metadata(str(tmp_path)).encoding("site")
    # plain str order (upper case first, "site10" < "site2")
    assert enc == {"Site1": 0, "site10": 1, "site2": 2}
    assert sorted(enc, key=enc.get) == sorted(set(values.values()))


def test_encoded_is_consistent_for_the_same_value(tmp_path):
    write_metadata(str(tmp_path), ACDC_LIKE)
    table = read_metadata(str(tmp_path))
    for column in ("patient", "phase", "site"):
        codes = table.encoded(column)
        assert set(codes) == set(ACDC_LIKE)
        for c1 in ACDC_LIKE:
            for c2 in ACDC_LIKE:
                same_value = ACDC_LIKE[c1][column] == ACDC_LIKE[c2][column]
                assert (codes[c1] == codes[c2]) == same_value, (column, c1, c2)
        # ids are 0..K-1
        assert sorted(set(codes.values())) == list(range(len({r[column] for r in ACDC_LIKE.values()})))


def test_encoding_does_not_depend_on_row_order(tmp_path):
    write_metadata(str(tmp_path / "a.csv"), ACDC_LIKE)
    write_metadata(str(tmp_path / "b.csv"), dict(reversed(list(ACDC_LIKE.items()))))
    a, b = read_metadata(str(tmp_path / "a.csv")), read_metadata(str(tmp_path / "b.csv"))
    for column in ("patient", "phase", "site"):
        assert a.encoded(column) == b.encoded(column)


# ----------------------------------------------------------------------------------- cross-checks and counts
def test_validate_against_cases(tmp_path):
    write_metadata(str(tmp_path), {"l1": {"phase": "ED"}, "u1": {"phase": "ES"}, "typo": {"phase": "ED"}})
    table = read_metadata(str(tmp_path))
    errors = validate_against_cases(table, labeled=["l1", "l2"], unlabeled=["u1", "u2"])
    assert len(errors) == 3
    (lab,) = [e for e in errors if "'l2'" in e]
    (unl,) = [e for e in errors if "'u2'" in e]
    (row,) = [e for e in errors if "'typo'" in e]
    assert "labeled case" in lab and "imagesTr" in lab and "no metadata row" in lab
    assert "unlabeled case" in unl and "imagesUnlabeled" in unl
    assert "Remove the row or add the image" in row
    assert all(METADATA_FILENAME in e for e in errors)


def test_validate_against_cases_all_good(tmp_path):
    write_metadata(str(tmp_path), {"l1": {"phase": "ED"}, "u1": {"phase": "ES"}})
    table = read_metadata(str(tmp_path))
    assert validate_against_cases(table, ["l1"], ["u1"]) == []
    # without the unlabeled list, u1 is a row naming an unknown case
    assert len(validate_against_cases(table, ["l1"])) == 1


def test_value_counts(tmp_path):
    rows = {"c1": {"phase": "ES", "n": "10"}, "c2": {"phase": "ED", "n": "2"}, "c3": {"phase": "ES", "n": "2"}}
    write_metadata(str(tmp_path), rows)
    counts = value_counts(read_metadata(str(tmp_path)))
    assert counts == {"patient": {"c1": 1, "c2": 1, "c3": 1}, "phase": {"ED": 1, "ES": 2}, "n": {"2": 2, "10": 1}}
    assert list(counts["n"]) == ["2", "10"]  # numeric order
    assert list(counts["phase"]) == ["ED", "ES"]
    for col, c in counts.items():
        assert sum(c.values()) == len(rows), col


def test_empty_meta_labels_declaration_means_only_the_default_patient(tmp_path):
    from nnunet_contrastive.data.metadata import read_metadata, write_metadata

    path = write_metadata(str(tmp_path / "m.csv"), {"c1": {"site": "A"}, "c2": {"site": "B"}}, ["site"])
    table = read_metadata(path, {"meta_labels": []})
    assert table.available_meta_labels() == ["patient"]
    assert read_metadata(path, {}).available_meta_labels() == ["patient", "site"]
