"""Artifact downloads: only files a job announced (never an arbitrary path), newest version of a name first."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse, RedirectResponse

from kiln_store import queries

from ..auth.access import access
from ..deps import ConnDep, SettingsDep

router = APIRouter(prefix="/jobs", tags=["artifacts"])


@router.get("/{job_id}/artifacts", response_model=list[dict[str, Any]], **access("viewer"))
async def list_artifacts(job_id: str, conn: ConnDep) -> list[dict[str, Any]]:
    if await queries.get_job(conn, job_id) is None:
        raise HTTPException(404, f"job {job_id!r} not found")
    return await queries.get_artifacts(conn, job_id)


@router.get("/{job_id}/artifacts/{name}", response_model=None, **access("viewer"))
async def download_artifact(
    job_id: str, name: str, conn: ConnDep, settings: SettingsDep,
    epoch: Annotated[int | None, Query(description="A given epoch's version; default the newest")] = None,
) -> FileResponse | RedirectResponse:
    """Download an artifact: the file itself when the API host can read it, or a presigned S3 URL."""
    if await queries.get_job(conn, job_id) is None:
        raise HTTPException(404, f"job {job_id!r} not found")
    found = [a for a in await queries.get_artifacts(conn, job_id)
             if a["name"] == name and (epoch is None or a["epoch"] == epoch)]
    if not found:
        raise HTTPException(404, f"job {job_id} has no artifact {name!r}" + (f" for epoch {epoch}" if epoch else ""))
    art = found[-1]
    uri: str = art["uri"]
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        import boto3

        client = boto3.client("s3", endpoint_url=settings.artifact_s3_endpoint_url)
        url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=900)
        return RedirectResponse(url, status_code=307)
    path = Path(uri.removeprefix("file://"))
    if not path.is_file():
        raise HTTPException(404, f"artifact {name!r} is stored at {uri}, which this API host cannot read "
                                 "(store artifacts in an object store to download them from anywhere)")
    return FileResponse(path, filename=path.name, media_type="application/octet-stream",
                        headers={"X-Kiln-Sha256": art["sha256"]})
