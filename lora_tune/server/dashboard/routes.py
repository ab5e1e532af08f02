"""The dashboard's routes on `lora-tune serve --runs-dir DIR`: its page and static files (open, they hold
no data), and a read-only JSON API over the run folders (behind the server's API key, like the rest).

The page itself talks to this API and to the server's own OpenAI routes (models, chat, fine-tuning jobs),
sending the key the user typed into it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml
from fastapi import FastAPI, Query
from fastapi.responses import FileResponse

from lora_tune.server.dashboard.runs import RunsFolder, load_yaml, read_records
from lora_tune.server.protocol import ApiError

STATIC = Path(str(resources.files("lora_tune.server.dashboard") / "static"))
ASSETS = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}
PAGE, STATIC_PREFIX = "/dashboard", "/dashboard/static/"


def is_open(path: str) -> bool:
    """Dashboard paths answered without the API key: the page and its static files (no run data)."""
    return path in (PAGE, PAGE + "/") or (path.startswith(STATIC_PREFIX) and path[len(STATIC_PREFIX) :] in ASSETS)


def add_dashboard_routes(app: FastAPI, runs: RunsFolder) -> None:
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    app.get(PAGE)(page)
    app.get(PAGE + "/")(page)

    @app.get(STATIC_PREFIX + "{name}")
    async def static(name: str):
        if name not in ASSETS:
            raise ApiError(404, f"no static file {name!r}", code="not_found")
        return FileResponse(STATIC / name, media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})

    @app.get(PAGE + "/api/runs")
    def list_runs():
        return {"root": str(runs.root.resolve()), "runs": [s.to_dict() for s in runs.summaries()]}

    @app.get(PAGE + "/api/runs/{name}")
    def run_detail(name: str):
        detail = runs.detail(name)
        if detail is None:
            raise _no_run(name)
        try:
            detail["config_values"] = load_yaml(detail["config"] or "") or {}
        except yaml.YAMLError:
            detail["config_values"] = {}
        return detail

    @app.get(PAGE + "/api/runs/{name}/metrics")
    def run_metrics(name: str, after: int = Query(0, ge=0)):
        """The run's metrics records from line `after` on, and the line to ask from next time."""
        folder = runs.folder(name)
        if folder is None:
            raise _no_run(name)
        records, count = read_records(folder / "metrics.jsonl", after)
        return {"records": records, "next": count}


def _no_run(name: str) -> ApiError:
    return ApiError(404, f"no run named {name!r} in the runs folder", code="not_found")
