"""The search service (``matching serve``): FastAPI over one bundle, thin over :class:`~matching.Matcher`.

Every request searches one generation (:meth:`Matcher.pin`); a background thread moves the service to a
generation another process published; writes need the bearer token. Needs the extra ``matching[serve]``.

``app`` builds the app (state, error handling, middleware) and wires in one router per file from ``routers/``
(search, score, writes, ops); ``state`` holds the served bundle, ``metrics`` the Prometheus counters, ``bodies``
the JSON bodies, ``server`` runs it under uvicorn.
"""

from matching.service.app import create_app, limit_body
from matching.service.server import app_from_env, read_token, serve
from matching.service.state import Service

__all__ = ["Service", "app_from_env", "create_app", "limit_body", "read_token", "serve"]
