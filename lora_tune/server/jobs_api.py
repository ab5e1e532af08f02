"""Routes of OpenAI's files and fine-tuning jobs APIs over a `JobService`."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse

from lora_tune.server.jobs import JobService, event_json, file_json, job_json
from lora_tune.server.protocol import ApiError


def _limit(request: Request, default: int) -> int:
    raw = request.query_params.get("limit", str(default))
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise ApiError(400, "limit must be an integer from 1 to 100", param="limit")
    return int(raw)


def _listing(data: list[dict], has_more: bool) -> dict:
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    return {"object": "list", "data": data, "has_more": has_more, "first_id": first, "last_id": last}


def add_job_routes(app: FastAPI, jobs: JobService, json_body) -> None:
    """Register /v1/files and /v1/fine_tuning/jobs on `app`; `json_body(request)` reads a JSON object."""

    @app.post("/v1/files")
    async def upload(request: Request):
        try:
            form = await request.form()
        except Exception as e:  # not multipart, or a broken body
            raise ApiError(400, f"send the file as multipart/form-data with fields file and purpose ({e})") from None
        upload, purpose = form.get("file"), form.get("purpose")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "the form has no file field", param="file")
        if not isinstance(purpose, str):
            raise ApiError(400, "the form has no purpose field (use 'fine-tune')", param="purpose")
        data = await upload.read()
        row = await asyncio.to_thread(jobs.add_file, upload.filename or "upload.jsonl", data, purpose)
        return file_json(row)

    @app.get("/v1/files")
    async def list_files(request: Request):
        rows, more = jobs.store.page("files", request.query_params.get("after"), _limit(request, 100))
        purpose = request.query_params.get("purpose")
        return _listing([file_json(r) for r in rows if purpose in (None, r["purpose"])], more)

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str):
        return file_json(jobs.file(file_id))

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str):
        jobs.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str):
        row = jobs.file(file_id)
        return FileResponse(row["path"], media_type="application/octet-stream", filename=row["filename"])

    @app.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request):
        return job_json(jobs.create(await json_body(request)))

    @app.get("/v1/fine_tuning/jobs")
    async def list_jobs(request: Request):
        rows, more = jobs.store.page("jobs", request.query_params.get("after"), _limit(request, 20))
        return _listing([job_json(r) for r in rows], more)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    async def get_job(job_id: str):
        return job_json(jobs.job(job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str):
        return job_json(await asyncio.to_thread(jobs.cancel, job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/pause")
    async def pause_job(job_id: str):
        return job_json(await asyncio.to_thread(jobs.pause, job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/resume")
    async def resume_job(job_id: str):
        return job_json(jobs.resume(job_id))

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request):
        jobs.job(job_id)
        rows, more = jobs.store.page(
            "events", request.query_params.get("after"), _limit(request, 20), "job_id = ?", (job_id,)
        )
        return _listing([event_json(r) for r in rows], more)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def job_checkpoints(job_id: str, request: Request):
        found = await asyncio.to_thread(jobs.checkpoints, job_id)
        after = request.query_params.get("after")
        if after:
            ids = [c["id"] for c in found]
            found = found[ids.index(after) + 1 :] if after in ids else []
        limit = _limit(request, 10)
        return _listing(found[:limit], len(found) > limit)
