import pytest

import tune_spaces


def test_paper_grid_has_twelve_cells():
    grid = tune_spaces.load("paper_grid")
    assert grid["density"] == [0.001, 0.01, 0.1, 1.0] and grid["dim"] == [64, 256, 1024]


def test_unknown_space_names_the_available_ones():
    with pytest.raises(FileNotFoundError, match="paper_grid"):
        tune_spaces.load("nope")
