"""Datasets on the runner: local paths and s3://bucket/prefix, cached by snapshot hash.

The snapshot hash is the SHA-256 of the dataset's manifest: (key, ETag, size) of every object for S3, (relative path,
size, mtime) of every file for a local folder.  An S3 snapshot is downloaded once into ``<cache>/<hash>`` through a
``.partial`` folder that is renamed only when complete, so a partial download is never used; concurrent jobs on one
runner wait for the same download (and other runner processes on the host for a file lock).

A local dataset must lie under the runner's data roots, and what its data YAML names too; a downloaded one may only
name files in its own snapshot folder (:mod:`kiln_contracts.data_roots`).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kiln_contracts import data_roots as paths

DATA_YAML_NAMES = ("data.yaml", "data.yml", "dataset.yaml")


class DatasetError(Exception):
    """The job's dataset cannot be used; the message is shown as the job's failure reason."""


@dataclass(frozen=True)
class Resolved:
    data: Path  # what Ultralytics gets as data=: a data YAML, or a folder for classification
    snapshot: str  # sha256 of the manifest
    files: int
    cached: bool  # True when an S3 snapshot came from the cache


def manifest_hash(entries: list[tuple[str, str, int]]) -> str:
    return hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()


def _local_manifest(root: Path) -> list[tuple[str, str, int]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.endswith(".cache") or name.startswith("."):
                continue  # Ultralytics' own label caches are not part of the data
            p = Path(dirpath) / name
            st = p.stat()
            out.append((str(p.relative_to(root)), str(st.st_mtime_ns), st.st_size))
    return out


def _data_entry(folder: Path, task: str, label: str) -> Path:
    if task == "classify":
        return folder
    for name in DATA_YAML_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise DatasetError(f"dataset has no data.yaml: {label}")


def resolve_local(dataset: str, task: str, roots: tuple[str, ...]) -> Resolved:
    path = Path(dataset).expanduser()
    paths.check(str(path), roots, f"dataset {dataset}")  # before it is even looked at: no hint of what lies outside
    if not path.exists():
        raise DatasetError(f"dataset not found: {dataset}")
    if task == "classify" and not path.is_dir():
        raise DatasetError(f"classification dataset must be a folder with train/ and val/: {dataset}")
    if path.is_file() and path.suffix not in (".yaml", ".yml"):
        raise DatasetError(f"dataset must be a data YAML or a folder holding data.yaml: {dataset}")
    data = _data_entry(path.resolve(), task, dataset) if path.is_dir() else path.resolve()
    paths.check_dataset(str(data), roots)
    root = data if data.is_dir() else data.parent
    entries = _local_manifest(root)
    return Resolved(data=data, snapshot=manifest_hash(entries), files=len(entries), cached=False)


def parse_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise DatasetError(f"s3 dataset needs a bucket: {uri}")
    return bucket, prefix.strip("/")


class DatasetCache:
    def __init__(self, root: Path, s3_factory: Callable[[], Any] | None = None,
                 allowed_buckets: list[str] | None = None, data_roots: Callable[[], tuple[str, ...]] = tuple) -> None:
        self.root = root
        self.data_roots = data_roots  # read at each job: a root may be created after the runner started
        self.s3_factory = s3_factory
        self.allowed = set(allowed_buckets or [])
        self._locks: dict[str, asyncio.Lock] = {}
        self.downloads = 0  # snapshots this process downloaded (tests and logs read it)
        self.hits = self.misses = self.downloaded_bytes = 0  # for the runner's metrics

    async def resolve(self, uri: str, task: str, say: Callable[[str], None] = lambda _: None) -> Resolved:
        if not uri.startswith("s3://"):
            return await asyncio.to_thread(resolve_local, uri, task, self.data_roots())
        bucket, prefix = parse_s3(uri)
        if self.allowed and bucket not in self.allowed:
            raise DatasetError(f"bucket {bucket!r} is not allowed on this runner (allowed: {sorted(self.allowed)})")
        if self.s3_factory is None:
            raise DatasetError("this runner has no S3 configuration")
        objects = await asyncio.to_thread(self._list, bucket, prefix, uri)
        snapshot = manifest_hash([(o["Key"], o["ETag"], o["Size"]) for o in objects])
        final = self.root / snapshot
        lock = self._locks.setdefault(snapshot, asyncio.Lock())
        async with lock:
            cached = (final / ".kiln-complete").exists()
            if cached:
                self.hits += 1
                say(f"dataset {uri} snapshot {snapshot[:12]} found in the cache ({len(objects)} files)")
            else:
                self.misses += 1
                say(f"downloading dataset {uri} snapshot {snapshot[:12]} ({len(objects)} files)")
                await asyncio.to_thread(self._download, bucket, prefix, objects, final, uri)
                self.downloads += 1
                self.downloaded_bytes += sum(int(o.get("Size") or 0) for o in objects)
                say(f"dataset {uri} downloaded into {final}")
        data = _data_entry(final, task, uri)
        await asyncio.to_thread(paths.check_dataset, str(data), paths.real_roots([final]), paths.DOWNLOADED)
        return Resolved(data=data, snapshot=snapshot, files=len(objects), cached=cached)

    def _list(self, bucket: str, prefix: str, uri: str) -> list[dict[str, Any]]:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.s3_factory()  # type: ignore[misc]
        objects: list[dict[str, Any]] = []
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                objects += [o for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchBucket", "404"):
                raise DatasetError(f"bucket not found: {bucket}") from exc
            raise DatasetError(f"cannot list {uri}: {code or exc}") from exc
        except BotoCoreError as exc:
            raise DatasetError(f"cannot reach the object store for {uri}: {exc}") from exc
        if not objects:
            raise DatasetError(f"no objects under {uri}")
        return objects

    def _download(self, bucket: str, prefix: str, objects: list[dict[str, Any]], final: Path, uri: str) -> None:
        from botocore.exceptions import ClientError

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f".{final.name}.lock", "w") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)  # another runner process on this host may be fetching it
            if (final / ".kiln-complete").exists():
                return
            partial = self.root / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
            client = self.s3_factory()  # type: ignore[misc]
            try:
                for obj in objects:
                    rel = obj["Key"][len(prefix):].lstrip("/") if prefix else obj["Key"]
                    target = (partial / rel).resolve()
                    if partial.resolve() not in target.parents:
                        raise DatasetError(f"object key escapes the dataset folder: {obj['Key']}")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        client.download_file(bucket, obj["Key"], str(target))
                    except ClientError as exc:
                        raise DatasetError(f"cannot download s3://{bucket}/{obj['Key']}: "
                                           f"{exc.response.get('Error', {}).get('Code', exc)}") from exc
                _point_data_yaml_here(partial, final)
                (partial / ".kiln-complete").write_text(json.dumps({"uri": uri, "files": len(objects)}))
                if final.exists():
                    shutil.rmtree(final)
                partial.rename(final)
            finally:
                if partial.exists():
                    shutil.rmtree(partial, ignore_errors=True)


def _point_data_yaml_here(partial: Path, final: Path) -> None:
    """A downloaded data YAML's ``path`` must point at its cache folder (its final name), wherever it pointed."""
    for name in DATA_YAML_NAMES:
        f = partial / name
        if f.is_file():
            doc = yaml.safe_load(f.read_text()) or {}
            if not isinstance(doc, dict):
                raise DatasetError(f"{name} is not a mapping")
            doc["path"] = str(final.resolve())
            f.write_text(yaml.safe_dump(doc, sort_keys=False))
