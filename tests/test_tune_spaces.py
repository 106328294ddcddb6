import json

import pytest

import tune_spaces
from fisher.io import FisherError


def test_paper_grid_has_twelve_cells():
    grid = tune_spaces.load("paper_grid")
    assert grid["density"] == [0.001, 0.01, 0.1, 1.0] and grid["dim"] == [64, 256, 1024]


def test_unknown_space_names_the_available_ones():
    with pytest.raises(FileNotFoundError, match="paper_grid"):
        tune_spaces.load("nope")


def test_load_grid_by_name_and_from_a_file(tmp_path):
    grid = tune_spaces.load_grid("paper_grid")
    assert grid["density"] == [0.001, 0.01, 0.1, 1.0] and grid["dim"] == [64, 256, 1024] and grid["seed"] == 0
    f = tmp_path / "g.json"
    f.write_text(json.dumps({"density": [1, "auto", None], "dim": [8]}))
    with pytest.raises(FisherError, match="repeated dim or density values"):     # auto and null are one density
        tune_spaces.load_grid(str(f))
    f.write_text(json.dumps({"density": [1, "auto"], "dim": [8, 16], "seed": 4}))
    assert tune_spaces.load_grid(str(f)) == {"density": [1.0, None], "dim": [8, 16], "seed": 4}


@pytest.mark.parametrize("space, message", [
    ({"density": [2.0], "dim": [8]}, r"density 2\.0 is not in \(0, 1\]"),
    ({"density": [0], "dim": [8]}, r"density 0 is not in \(0, 1\]"),
    ({"density": [True], "dim": [8]}, r"density True is not in \(0, 1\]"),
    ({"density": [1.0], "dim": [8, 8]}, "repeated dim or density values"),
    ({"density": [0.1, 0.1], "dim": [8]}, "repeated dim or density values"),
    ({"density": [1.0], "dim": [0]}, "dim 0 is not a positive integer"),
    ({"density": [1.0], "dim": [8.0]}, "dim 8.0 is not a positive integer"),
    ({"density": [1.0]}, "needs non-empty 'density' and 'dim' lists"),
    ({"density": [], "dim": [8]}, "needs non-empty 'density' and 'dim' lists"),
    ([1, 2], "needs non-empty 'density' and 'dim' lists"),
])
def test_bad_grid_is_a_one_line_error_naming_the_flag(tmp_path, space, message):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(space))
    with pytest.raises(FisherError, match=message) as e:
        tune_spaces.load_grid(str(f))
    assert str(e.value).startswith(f"--grid {f}: ") and "\n" not in str(e.value)
    with pytest.raises(FisherError, match=f"^sweep.grid {f}: "):
        tune_spaces.load_grid(str(f), flag="sweep.grid")


def test_missing_unknown_and_corrupt_grids(tmp_path):
    with pytest.raises(FisherError, match=r"^--grid no_such: no search space 'no_such' \(have: paper_grid\); "
                                          "or pass a JSON file"):
        tune_spaces.load_grid("no_such")
    with pytest.raises(FisherError, match="file not found; pass a tune_spaces name or a JSON file"):
        tune_spaces.load_grid(str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FisherError, match="not valid JSON"):
        tune_spaces.load_grid(str(tmp_path / "bad.json"))
