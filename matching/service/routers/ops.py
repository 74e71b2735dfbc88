"""The search page and the operator's routes: ``/health``, ``/ready``, ``/info``, ``/metrics``."""

from importlib import resources
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, PlainTextResponse

from matching.service.state import ReadDep, ServiceDep

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> str:
    return resources.files("matching.service").joinpath("search_page.html").read_text(encoding="utf-8")


@router.get("/health")
def health() -> dict[str, str]:
    """Alive (the bundle may still be loading: see /ready)."""
    return {"status": "ok"}


@router.get("/ready")
def ready(service: ServiceDep) -> dict[str, Any]:
    """200 once the bundle is loaded, with its generation and title count; 503 before."""
    matcher = service.pinned()
    return {"status": "ready", "generation": matcher.generation, "count": len(matcher)}


@router.get("/info")
def info(request: Request, service: ReadDep) -> dict[str, Any]:
    """The bundle's manifest, its metadata fields and this service's bounds; where it lies on disk, its source
    file and any other local path only for a request with the write token."""
    matcher = service.pinned()
    out = {
        **matcher.info(),
        "path": str(service.path),
        "generation": matcher.generation,
        "count": len(matcher),
        "metadata_keys": matcher.store.metadata_keys(),
        "limits": service.config.to_dict(),
        "writes": service.token is not None,
        "reads_need_token": service.read_token is not None,
    }
    if service.authenticated(request):
        return out
    out.pop("path")
    if isinstance(out.get("source"), dict):
        out["source"] = {k: v for k, v in out["source"].items() if k != "name"}
    return {key: _no_paths(value) for key, value in out.items()}


def _no_paths(value: Any) -> Any:
    """``value`` with every absolute path (a model directory, a pairs file) cut to its last part."""
    if isinstance(value, dict):
        return {k: _no_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_paths(v) for v in value]
    if isinstance(value, str) and (PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute()):
        return PureWindowsPath(value).name  # splits at both separators
    return value


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(service: ReadDep) -> str:
    """Prometheus text: requests, errors, latency histogram, generation, micro-batches."""
    return service.metrics.render(service.matcher) + service.batcher.render()
