"""FID/KID spread over seeds (fisher.reports.spread) on hand-made fid.json contents."""
from __future__ import annotations

import math

from fisher.reports.spread import difference, spread, spread_table


def _result(label, fid, kid=None, floor=None, seed=0):
    r = {"label": label, "fid": {"0": fid[0], "0.5": fid[1]}, "pairs": 10, "seed": seed,
         "real": {"split": "test", "count": 20}}
    if kid:
        r["kid"] = {"0": {"mean": kid[0], "stderr": 0.001}, "0.5": {"mean": kid[1], "stderr": 0.002}}
    if floor:
        r["real_floor"] = {"split": "train", "count": 10, "fid": floor, "kid": {"mean": floor / 1000}}
    return r


def test_mean_and_sample_sd_over_seeds():
    rs = [_result("fisher/conv", (10, 20)), _result("fisher/conv", (12, 26)), _result("fisher/conv", (14, 23))]
    s = spread(rs, "fid")
    assert s["0"] == {"mean": 12.0, "sd": 2.0, "n": 3}
    assert math.isclose(s["0.5"]["mean"], 23.0) and math.isclose(s["0.5"]["sd"], 3.0)


def test_one_seed_kid_shows_its_stderr_and_fid_no_spread():
    rs = [_result("a/conv", (10, 20), kid=(0.01, 0.02))]
    assert spread(rs, "kid")["0.5"] == {"mean": 0.02, "sd": 0.002, "n": 1}
    assert spread(rs, "fid")["0.5"]["sd"] is None


def test_table_rows_floor_and_paper():
    by_kind = {"fisher": [_result("fisher/conv", (10, 20), floor=5), _result("fisher/conv", (12, 22), floor=7)],
               "activation": [_result("activation/conv", (8, 30), floor=6), _result("activation/conv", (8, 34))]}
    table = spread_table(by_kind, "fid", paper={"fisher/conv": {0.0: 1.21, 0.5: 5.43}})
    lines = table.splitlines()
    assert lines[0] == "| embedding / decoder | α = 0 | α = 0.5 | seeds | N pairs |"
    assert "| fisher/conv | 11.00 ± 1.41 | 21.00 ± 1.41 | 2 | 10 |" in lines
    assert "| activation/conv | 8.00 ± 0.00 | 32.00 ± 2.83 | 2 | 10 |" in lines
    assert "| real train images (floor at this N) | 6.00 ± 1.00 | 6.00 ± 1.00 | 3 | 10 |" in lines
    assert "| fisher/conv (paper) | 1.21 | 5.43 | 1 | 50000 |" in lines
    same = {"fisher": [_result("fisher/conv", (10, 20), floor=5, seed=k) for k in range(3)]}
    assert "| real train images (floor at this N) | 5.00 | 5.00 | 1 | 10 |" in spread_table(same).splitlines()


def test_difference_with_standard_error():
    a = [_result("f", (0, v)) for v in (10.0, 12.0, 14.0)]
    b = [_result("a", (0, v)) for v in (20.0, 20.0, 23.0)]
    d = difference(a, b, 0.5)
    assert math.isclose(d["difference"], 12.0 - 21.0)
    assert math.isclose(d["stderr"], math.sqrt(4.0 / 3 + 3.0 / 3))
    assert difference(a[:1], b, 0.5) is None
