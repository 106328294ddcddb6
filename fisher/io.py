"""Artifact I/O: local or remote (``s3://``, ``gs://``) paths through pyarrow
filesystems, atomic writes, and the JSON manifest every artifact carries
(DESIGN.md, "Data flow and formats").

Every artifact is a directory holding data files plus ``manifest.json``:
which stage made it, with which config and seeds, from which inputs (by
manifest hash), with which library versions. Writes go to a temporary name
first and are renamed into place, so a killed job never leaves a file that
looks complete.

``gs://`` URIs: with ``STORAGE_EMULATOR_HOST`` set (the variable Google's client libraries and
fake-gcs-server use, e.g. ``http://127.0.0.1:4443``; scheme ``http`` when the value has none), a
``gs://bucket/key`` is opened as ``bucket/key`` on ``pyarrow.fs.GcsFileSystem(endpoint_override=
HOST:PORT, scheme=..., anonymous=True)``: the emulator, without credentials
(``FileSystem.from_uri`` ignores the variable and would wait on Google's credential servers).
Without it, ``FileSystem.from_uri``: credentials from the environment
(``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's defaults, the machine's service account).
:func:`ray_storage` gives Ray Data / Train / Tune the same filesystem, so Ray's processes (which
inherit the variable from the process that starts a local Ray) reach the same store.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import uuid
from datetime import timedelta
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST = "manifest.json"


from fisher.errors import FisherError  # noqa: E402,F401  (re-exported: stages import it from here)


EMULATOR_ENV = "STORAGE_EMULATOR_HOST"     # a GCS emulator's address: gs:// goes there, anonymously
EMULATOR_RETRY_S = 30                      # how long a gs:// call keeps retrying an emulator that does not answer


def _emulator(value: str) -> tuple[str, str]:
    """(scheme, host:port) of a ``STORAGE_EMULATOR_HOST`` value: ``http://127.0.0.1:4443``, ``127.0.0.1:4443``."""
    scheme, _, rest = value.strip().rpartition("://")
    host = rest.split("/", 1)[0]
    if not host or (scheme or "http") not in ("http", "https"):
        raise FisherError(f"{EMULATOR_ENV}={value!r}: expected [http://|https://]HOST:PORT of a GCS emulator "
                          f"(e.g. http://127.0.0.1:4443); fix it or unset it to use Google Cloud Storage")
    return scheme or "http", host


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path) for a local path or a URI pyarrow knows (``gs://`` with an emulator: see
    the module's docstring)."""
    uri = str(uri)
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    scheme, _, rest = uri.partition("://")
    emulator = os.environ.get(EMULATOR_ENV, "").strip()
    if scheme.lower() in ("gs", "gcs") and emulator:
        path = rest.strip("/")
        if not path.split("/", 1)[0]:
            raise FisherError(f"{uri}: no bucket; pass gs://BUCKET/prefix")
        how, host = _emulator(emulator)
        return pafs.GcsFileSystem(endpoint_override=host, scheme=how, anonymous=True,
                                  retry_time_limit=timedelta(seconds=EMULATOR_RETRY_S)), path
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise FisherError(f"{uri}: cannot open this location ({e}); pass a local path or an s3:// or gs:// URI") from e


def ray_storage(uri: str) -> tuple[str, pafs.FileSystem | None]:
    """(path, filesystem) for Ray's ``storage_path`` / ``storage_filesystem`` and Ray Data's ``filesystem``:
    an absolute local path and None (Ray's own local handling), or a URI's scheme-less path and the
    filesystem :func:`resolve` opens for it (a gs:// emulator included)."""
    if "://" not in str(uri):
        return resolve(uri)[1], None
    fs, path = resolve(uri)
    return path, fs


def join(uri: str, *parts: str) -> str:
    """``uri`` and ``parts`` joined by single slashes; empty parts are left out."""
    uri = str(uri).rstrip("/")
    return "/".join([uri, *[p.strip("/") for p in parts if p]])


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files directly under directory ``uri`` ending in ``suffix``, sorted, as URIs."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FisherError(f"{uri}: not a directory; pass the artifact directory a previous stage wrote")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix)
                   and not i.base_name.startswith("."))
    return [join(uri, n) for n in names]


def _tmp_name(path: str) -> str:
    head, tail = path.rsplit("/", 1) if "/" in path else ("", path)
    tmp = f".{tail}.tmp-{uuid.uuid4().hex[:12]}"
    return f"{head}/{tmp}" if head else tmp


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def check_output(uri: str) -> None:
    """Refuse an ``s3://`` / ``gs://`` output whose bucket is missing or unreachable, before anything
    is written (local directories are created as needed)."""
    if "://" not in str(uri):
        return
    fs, path = resolve(uri)
    if fs.type_name not in ("s3", "gcs"):
        return
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as e:
        where = (f"GOOGLE_APPLICATION_CREDENTIALS or the machine's service account) and {EMULATOR_ENV}"
                 if fs.type_name == "gcs" else "AWS_* variables or the machine's IAM role) and AWS_ENDPOINT_URL")
        raise FisherError(f"{uri}: cannot reach bucket '{bucket}' ({_first_line(e)}); check the credentials "
                          f"({where}") from e
    if info.type == pafs.FileType.NotFound:
        raise FisherError(f"{uri}: bucket '{bucket}' does not exist (or these credentials cannot see it); "
                          "create it or pass another location")


def atomic_write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` under a temporary name, then rename it into place."""
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    # GCS: no directory marker objects; an object needs no parents there, and pyarrow's create_dir
    # creates a missing bucket (with a project configured) where a write should fail
    if parent and fs.type_name != "gcs":
        try:
            fs.create_dir(parent, recursive=True)
        except OSError as e:
            raise FisherError(f"{uri}: cannot write ({_first_line(e)})") from e
    tmp = _tmp_name(path)
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    except BaseException as e:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):      # no space, no permission, no bucket, network: one line naming the file
            raise FisherError(f"{uri}: cannot write ({_first_line(e)})") from e
        raise


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path, compression=None) as f:
            return f.read()
    except FileNotFoundError as e:
        raise FisherError(f"{uri}: file not found") from e
    except OSError as e:                # a directory where a file belongs, no permission, ...
        raise FisherError(f"{uri}: cannot be read ({_first_line(e)}); it must be a readable file") from e


ROW_GROUP = 1024   # rows per Parquet row group: lets readers split a shard into several blocks


def read_json(uri: str, what: str, fix: str, kind: type = dict):
    """A JSON file this project wrote, as ``kind`` (an object by default): one error line naming the file,
    what it should be and ``fix`` when it is unreadable, not JSON, or JSON of another shape."""
    try:
        value = json.loads(read_bytes(uri))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FisherError(f"{uri}: corrupt {what} ({_first_line(e)}); {fix}") from e
    if not isinstance(value, kind):
        raise FisherError(f"{uri}: not a {what} (a JSON {type(value).__name__}, not "
                          f"{'an array' if kind is list else 'an object'}); {fix}")
    return value


def atomic_write_table(uri: str, table: pa.Table) -> None:
    """Write an Arrow table as one Parquet file (row groups of ``ROW_GROUP`` rows), atomically."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=ROW_GROUP)
    atomic_write_bytes(uri, buf.getvalue())


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = resolve(uri)
    try:
        return pq.read_table(path, filesystem=fs, columns=columns)
    except FileNotFoundError as e:
        raise FisherError(f"{uri}: file not found") from e
    except (pa.ArrowException, OSError) as e:
        raise FisherError(f"{uri}: not a readable Parquet file ({_first_line(e)}); "
                          "delete it and rerun the stage that wrote it") from e


def parquet_metadata(uri: str, rows: int | None = None,
                     fix: str = "delete it and rerun the stage that wrote it", columns=()) -> pq.FileMetaData:
    """A Parquet file's footer, read without its data: a cheap check, before any work starts, that a
    shard is readable (not truncated or replaced), given ``rows`` holds the rows its manifest says, and
    has the ``columns`` a stage reads."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
    except FileNotFoundError as e:
        raise FisherError(f"{uri}: file not found; {fix}") from e
    except (pa.ArrowException, OSError) as e:
        raise FisherError(f"{uri}: not a readable Parquet file ({_first_line(e)}); {fix}") from e
    if rows is not None and meta.num_rows != rows:
        raise FisherError(f"{uri}: holds {meta.num_rows} rows but its manifest says {rows}; {fix}")
    names = meta.schema.to_arrow_schema().names
    for column in columns:
        if column not in names:
            raise FisherError(f"{uri}: no column '{column}' (has {', '.join(names)}); {fix}")
    return meta


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for name in ("fisher-ray", "torch", "numpy", "pyarrow", "ray", "torchvision", "pytorch-fid"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def write_manifest(dir_uri: str, stage: str, config: dict, inputs: dict[str, str] | None = None,
                   **extra: Any) -> dict:
    """Write ``manifest.json`` (atomically) into artifact directory ``dir_uri``.

    ``inputs`` maps a role ("prior", "data") to the input artifact's manifest hash.
    """
    manifest = {"stage": stage, "config": config, "inputs": inputs or {},
                "versions": library_versions(), **extra}
    atomic_write_bytes(join(dir_uri, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest


def read_manifest(dir_uri: str, stage: str | None = None) -> dict:
    uri = join(dir_uri, MANIFEST)
    if not exists(uri):
        what = f"a '{stage}' artifact" if stage else "an artifact"
        raise FisherError(f"{dir_uri}: no {MANIFEST}; this is not {what} (run `fisher {stage or '<stage>'}` to make one)")
    manifest = read_json(uri, "manifest", "rerun the stage that wrote it")
    if stage is not None and manifest.get("stage") != stage:
        raise FisherError(f"{dir_uri}: made by stage '{manifest.get('stage')}', expected '{stage}'")
    _check_fields(uri, manifest)
    return manifest


_FIELDS = {"prepare": {"image_shape": list, "shards": list, "counts": dict},   # what stages read from a manifest
           "embed": {"columns": dict, "shards": list, "config": dict},
           "train-prior": {"config": dict}, "train-decoder": {"config": dict, "inputs": dict},
           "evaluate": {"config": dict, "inputs": dict}}


def _check_fields(uri: str, manifest: dict) -> None:
    """The fields other stages read, with their JSON types; shard names are plain file names."""
    fix = "rerun the stage that wrote it"
    for key, kind in _FIELDS.get(manifest.get("stage"), {}).items():
        if not isinstance(manifest.get(key), kind):
            raise FisherError(f"{uri}: field '{key}' is {manifest.get(key)!r:.60}, not a JSON "
                              f"{'array' if kind is list else 'object'}; {fix}")
    shape = manifest.get("image_shape")
    if shape is not None and not (len(shape) == 3 and all(isinstance(v, int) and not isinstance(v, bool)
                                                          and 1 <= v <= 1 << 14 for v in shape)):
        raise FisherError(f"{uri}: field 'image_shape' is {shape!r:.60}, not [H, W, C] of positive sizes; {fix}")
    for column, spec in (manifest.get("columns") or {}).items() if manifest.get("stage") == "embed" else ():
        dim = spec.get("dim") if isinstance(spec, dict) else None
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise FisherError(f"{uri}: column '{column}' is described as {spec!r:.60}, not {{\"dim\": N, ...}} "
                              f"with N >= 1; {fix}")
    for split, count in (manifest.get("counts") or {}).items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise FisherError(f"{uri}: field 'counts' gives split {split!r:.40} {count!r:.40}, not a count >= 0; {fix}")
    levels = manifest.get("levels")
    if manifest.get("stage") == "prepare" and levels is not None and not (
            isinstance(levels, int) and not isinstance(levels, bool) and 2 <= levels <= 1 << 16):
        raise FisherError(f"{uri}: field 'levels' is {levels!r:.60}, not an integer in [2, 65536]; {fix}")
    for shard in manifest.get("shards") or []:
        name = shard.get("file") if isinstance(shard, dict) else shard
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
            raise FisherError(f"{uri}: shard entry {shard!r:.80} does not name a file of this directory; {fix}")
        if manifest.get("stage") == "prepare":      # prepared shards: {file, split, rows}
            rows, split = (shard.get("rows"), shard.get("split")) if isinstance(shard, dict) else (None, None)
            if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 0):
                raise FisherError(f"{uri}: shard {name} has 'rows' {rows!r:.40}, not a count >= 0; {fix}")
            if not (isinstance(split, str) and split):
                raise FisherError(f"{uri}: shard {name} has 'split' {split!r:.40}, not a split name; {fix}")


def manifest_hash(manifest: dict) -> str:
    """Content hash identifying an artifact (its manifest without library versions)."""
    core = {k: v for k, v in manifest.items() if k != "versions"}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


LOGS = "logs"           # the command's log files inside an --out; not part of the artifact (claims ignore it)
PLAN = "_plan.json"     # written when a stage claims a directory: which stage fills it, and with what


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested dicts as {'decoder.epochs': 10, ...}, so a refusal names the exact value that differs."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_output_path(out: str) -> None:
    """Refuse an ``--out`` that can never be a stage's own directory: empty, a filesystem or bucket root,
    or an existing file."""
    if not str(out).strip():
        raise FisherError("--out '': an empty path (it would write into the current directory's root); "
                          "pass a new directory path")
    fs, path = resolve(out)
    if "://" in str(out) and "/" not in path.strip("/"):
        raise FisherError(f"--out {out}: a bucket root; pass a prefix inside it (e.g. {str(out).rstrip('/')}/run)")
    if "://" not in str(out) and os.path.dirname(path) == path:
        raise FisherError(f"--out {out}: a filesystem root; pass a new directory path")
    if fs.get_file_info(path).type == pafs.FileType.File:
        raise FisherError(f"--out {out}: exists and is not a directory; pass a new directory path")


def _children(fs: pafs.FileSystem, path: str) -> list[str]:
    """Names directly under directory ``path``. pyarrow's GCS listing of one level returns the objects
    there and only those subdirectories that have a marker object (``dir/``, which GCS returns with
    ``includeTrailingDelimiter``; gcp-storage-emulator never does); a prefix without one (this module
    writes none on GCS, nor do many other tools) would be missed. On GCS the names come from the
    recursive listing, cut to one level."""
    if fs.type_name != "gcs":
        return [i.base_name for i in fs.get_file_info(pafs.FileSelector(path))]
    root = path.rstrip("/") + "/"
    below = (i.path[len(root):] for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)))
    return sorted({rest.split("/", 1)[0] for rest in below if rest})


def _entries(out: str) -> list[str]:
    fs, path = resolve(out)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(n for n in _children(fs, path) if n != LOGS)


def _remove_dir(fs: pafs.FileSystem, path: str) -> None:
    """``fs.delete_dir(path)``. On GCS pyarrow deletes the objects under the prefix, then the prefix's
    marker object (``path/``), which is missing when no ``create_dir`` wrote one: that 404 is no
    failure once nothing is left there."""
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            raise


def output_state(out: str) -> tuple[bool, bool]:
    """(``out`` exists, ``out`` holds a claim): taken before a stage runs, for ``release_claim``."""
    return exists(out), PLAN in _entries(out)


def release_claim(out: str, before: tuple[bool, bool]) -> bool:
    """Undo a claim that no work followed: when a stage fails after ``claim_output`` wrote ``_plan.json``
    but before it wrote anything else, remove that claim (and the directory, its ``logs/`` with it, if the
    stage made it), so a refused command leaves nothing behind. A claim that was there before, and any
    work, are kept for a rerun to continue. True when the claim was undone."""
    existed, claimed = before
    names = _entries(out)
    if claimed or names not in ([], [PLAN]):
        return False
    fs, path = resolve(out)
    if names:
        fs.delete_file(join(path, PLAN))
    if not existed and fs.get_file_info(path).type == pafs.FileType.Directory:
        _remove_dir(fs, path)
    return True


def claim_output(out: str, stage: str, plan: dict | None = None, write: bool = True) -> None:
    """Claim ``out`` for ``stage`` before any work: it must be new, empty, or a directory this stage
    claimed before (its ``_plan.json`` or ``manifest.json`` names ``stage``). Anything else is refused:
    an empty path, a root, a file, another stage's artifact, a directory holding files no stage wrote.
    With ``plan``, a directory claimed with another plan is refused naming each value that differs.
    ``write`` records the claim (``_plan.json``); ``write=False`` only checks, writing nothing."""
    check_output_path(out)
    names = _entries(out)
    if MANIFEST in names:
        old = read_manifest(out).get("stage")
        if old != stage:
            raise FisherError(f"{out}: holds a '{old}' artifact; pass a new --out")
    uri, claimed = join(out, PLAN), None
    if PLAN in names:
        try:
            claimed = json.loads(read_bytes(uri))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FisherError(f"{uri}: corrupt ({e}); pass a new --out") from e
        if not isinstance(claimed, dict):
            raise FisherError(f"{uri}: not a claim written by fisher; pass a new --out")
        owner = claimed.get("stage", stage if plan is not None else "embed` or `fisher sweep")   # older plans: no stage
        if owner != stage:
            raise FisherError(f"{out}: claimed by an unfinished `fisher {owner}`; pass a new --out")
    elif names and MANIFEST not in names:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise FisherError(f"{out}: not empty and not made by `fisher {stage}` (holds {shown}); "
                          "pass a new or empty --out")
    record = {"stage": stage, **(plan or {})}
    if plan is not None:
        if claimed is not None:
            old = {k: v for k, v in claimed.items() if k != "stage"}
            if old != plan:
                a, b = _flat(old), _flat(plan)
                diff = "; ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} now"
                                 for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k))
                raise FisherError(f"{out}: holds a {stage} run made with a different config ({diff}); "
                                  "pass a new --out")
        elif MANIFEST in names:
            raise FisherError(f"{out}: holds a {stage} artifact without its {PLAN}; pass a new --out")
    if write and claimed is None and MANIFEST not in names:     # a finished artifact is its own claim
        atomic_write_bytes(uri, json.dumps(record, indent=2, sort_keys=True).encode())
