"""Request counts, errors and latency per route, rendered as Prometheus text (``GET /metrics``)."""

import threading

from matching.matcher import Matcher

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Request counts, errors and a latency histogram per route, rendered as Prometheus text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[route, status] = self.requests.get((route, status), 0) + 1
            counts = self.buckets.setdefault(route, [0] * (len(_BUCKETS) + 1))
            counts[next((i for i, b in enumerate(_BUCKETS) if seconds <= b), len(_BUCKETS))] += 1
            self.sums[route] = self.sums.get(route, 0.0) + seconds

    def render(self, matcher: Matcher | None) -> str:
        out = [
            "# HELP matching_requests_total Requests by route and HTTP status.",
            "# TYPE matching_requests_total counter",
        ]
        with self._lock:
            for (route, status), n in sorted(self.requests.items()):
                out.append(f'matching_requests_total{{route="{route}",status="{status}"}} {n}')
            out += self._errors()
            out += self._latency()
        if matcher is not None:
            out += _bundle_gauges(matcher)
        return "\n".join(out) + "\n"

    def _errors(self) -> list[str]:
        errors: dict[str, int] = {}
        for (route, status), n in self.requests.items():
            if status >= 400:
                errors[route] = errors.get(route, 0) + n
        out = [
            "# HELP matching_errors_total Requests answered 4xx or 5xx.",
            "# TYPE matching_errors_total counter",
        ]
        return out + [f'matching_errors_total{{route="{r}"}} {n}' for r, n in sorted(errors.items())]

    def _latency(self) -> list[str]:
        out = [
            "# HELP matching_request_seconds Request latency.",
            "# TYPE matching_request_seconds histogram",
        ]
        for route, counts in sorted(self.buckets.items()):
            total = 0
            for bound, n in zip((*_BUCKETS, float("inf")), counts, strict=True):
                total += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                out.append(f'matching_request_seconds_bucket{{route="{route}",le="{le}"}} {total}')
            out.append(f'matching_request_seconds_sum{{route="{route}"}} {self.sums[route]:.6f}')
            out.append(f'matching_request_seconds_count{{route="{route}"}} {total}')
        return out


def _bundle_gauges(matcher: Matcher) -> list[str]:
    generation = matcher.generation or ""
    return [
        "# HELP matching_generation The bundle generation served (its number).",
        "# TYPE matching_generation gauge",
        f"matching_generation {int(generation.rpartition('-')[2] or 0)}",
        "# HELP matching_titles Live titles in the served generation.",
        "# TYPE matching_titles gauge",
        f"matching_titles {len(matcher)}",
    ]
