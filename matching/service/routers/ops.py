"""The search page and the operator's routes: ``/health``, ``/ready``, ``/info``, ``/metrics``."""

from importlib import resources
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, PlainTextResponse

from matching.service.state import ServiceDep

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
def info(service: ServiceDep) -> dict[str, Any]:
    """The bundle's manifest, its metadata fields and this service's bounds."""
    matcher = service.pinned()
    return {
        **matcher.info(),
        "path": str(service.path),
        "generation": matcher.generation,
        "count": len(matcher),
        "metadata_keys": matcher.store.metadata_keys(),
        "limits": service.config.to_dict(),
        "writes": service.token is not None,
    }


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(service: ServiceDep) -> str:
    """Prometheus text: requests, errors, latency histogram, generation."""
    return service.metrics.render(service.matcher)
