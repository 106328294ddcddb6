"""fisher.io: output claims (``_plan.json``) and the JSON records stages read back."""
import json

import pytest

from fisher.io import PLAN, FisherError, claim_output, output_state, ray_storage, read_json, release_claim, resolve


def test_a_claim_that_no_work_followed_is_undone_with_the_directory_it_made(tmp_path):
    out = tmp_path / "new"
    before = output_state(str(out))
    claim_output(str(out), "embed", {"seed": 0})
    assert (out / PLAN).exists()
    release_claim(str(out), before)
    assert not out.exists()


def test_an_empty_directory_given_by_the_user_stays(tmp_path):
    before = output_state(str(tmp_path))
    claim_output(str(tmp_path), "embed", {"seed": 0})
    release_claim(str(tmp_path), before)
    assert tmp_path.is_dir() and not list(tmp_path.iterdir())


def test_work_and_an_earlier_claim_are_kept_for_a_rerun(tmp_path):
    out = tmp_path / "run"
    before = output_state(str(out))
    claim_output(str(out), "embed", {"seed": 0})
    (out / "train-00000.parquet").write_bytes(b"shard")        # work after the claim: a rerun continues it
    release_claim(str(out), before)
    assert (out / PLAN).exists()
    (out / "train-00000.parquet").unlink()
    before = output_state(str(out))                              # claimed by an earlier, interrupted run
    claim_output(str(out), "embed", {"seed": 0})
    release_claim(str(out), before)
    assert (out / PLAN).exists()


def test_read_json_names_the_file_and_the_shape(tmp_path):
    f = tmp_path / "fid.json"
    f.write_text(json.dumps([1, 2]))
    with pytest.raises(FisherError, match=r"fid\.json: not a FID result \(a JSON list, not an object\); rerun"):
        read_json(str(f), "FID result", "rerun")
    f.write_bytes(b"\xff{")
    with pytest.raises(FisherError, match=r"fid\.json: corrupt FID result \(.+\); rerun"):
        read_json(str(f), "FID result", "rerun")
    f.write_text('{"fid": 1}')
    assert read_json(str(f), "FID result", "rerun") == {"fid": 1}


@pytest.mark.parametrize("value, scheme, host", [("http://127.0.0.1:4443", "http", "127.0.0.1:4443"),
                                                 ("127.0.0.1:4443", "http", "127.0.0.1:4443"),
                                                 ("https://gcs.test:8443/", "https", "gcs.test:8443")])
def test_gs_goes_to_the_emulator_named_by_storage_emulator_host(monkeypatch, value, scheme, host):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", value)
    fs, path = resolve("gs://bucket/a/b/")
    options = fs.__reduce__()[1][0]         # what a Ray worker receives when the filesystem is pickled
    assert (fs.type_name, path) == ("gcs", "bucket/a/b")
    assert (options["endpoint_override"], options["scheme"], options["anonymous"]) == (host, scheme, True)
    path, filesystem = ray_storage("gs://bucket/a/ray")
    assert path == "bucket/a/ray" and filesystem.type_name == "gcs"


def test_a_bad_storage_emulator_host_or_a_gs_uri_without_bucket_is_refused(monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "ftp://127.0.0.1:4443")
    with pytest.raises(FisherError, match=r"^STORAGE_EMULATOR_HOST='ftp://127.0.0.1:4443': expected "):
        resolve("gs://bucket/a")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:4443")
    with pytest.raises(FisherError, match=r"^gs://: no bucket"):
        resolve("gs://")


def test_ray_storage_of_a_local_path_is_absolute_and_leaves_the_filesystem_to_ray(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ray_storage("out/ray") == (str(tmp_path / "out" / "ray"), None)
