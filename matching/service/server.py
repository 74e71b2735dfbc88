"""Running the service under uvicorn (``matching serve``): the token files, and the environment from which each
worker process of ``--workers N`` builds its app."""

import json
import os
import stat
import warnings
from pathlib import Path

from fastapi import FastAPI

from matching.config import ServiceConfig
from matching.errors import ConfigError
from matching.service.app import create_app

# environment of `matching serve --workers N`: each uvicorn worker process builds its app from it
ENV_BUNDLE, ENV_TOKEN, ENV_CONFIG = "MATCHING_SERVE_BUNDLE", "MATCHING_SERVE_TOKEN_FILE", "MATCHING_SERVE_CONFIG"
ENV_READ_TOKEN = "MATCHING_SERVE_READ_TOKEN_FILE"
_MIN_TOKEN = 16  # a guessable token is no token


def read_token(path: str | Path) -> str:
    """The write or read token: the first line of ``path``, stripped; at least 16 characters of printable ASCII without
    spaces (what an ``Authorization`` header carries), else a ConfigError naming the file and the rule. Warns
    when the file is readable by group or others, or holds more than one line (the others are ignored)."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # an editor's byte-order mark is no part of it
        mode = Path(path).stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the token file {name!r}: {exc}") from None
    first, _, rest = text.partition("\n")
    token = first.strip()
    rule = f"{_MIN_TOKEN} or more printable ASCII characters, no spaces, on the first line"
    if not token:
        raise ConfigError(f"the token file {name!r} has nothing on its first line; a token is {rule}")
    bad = next((c for c in token if not "!" <= c <= "~"), None)
    if bad is not None:
        raise ConfigError(f"the token in {name!r} holds {bad!r}, which a header cannot carry; a token is {rule}")
    if len(token) < _MIN_TOKEN:
        raise ConfigError(f"the token in {name!r} has {len(token)} characters; a token is {rule}")
    if rest.strip():
        warnings.warn(f"the token file {name!r} has more than one line; only the first is the token", stacklevel=2)
    if os.name == "posix" and mode & 0o044:
        warnings.warn(
            f"the token file {name!r} is readable by other users (mode {stat.S_IMODE(mode):o}); chmod 600 it",
            stacklevel=2,
        )
    return token


def app_from_env() -> FastAPI:
    """The app for one worker of ``matching serve --workers N`` (uvicorn's factory)."""
    token_file, read_file = os.environ.get(ENV_TOKEN), os.environ.get(ENV_READ_TOKEN)
    config = ServiceConfig.from_dict(json.loads(os.environ.get(ENV_CONFIG) or "{}"))
    return create_app(
        os.environ[ENV_BUNDLE],
        token=read_token(token_file) if token_file else None,
        read_token=read_token(read_file) if read_file else None,
        config=config,
    )


def serve(
    bundle: str | Path,
    *,
    host: str,
    port: int,
    workers: int = 1,
    token_file: str | Path | None = None,
    read_token_file: str | Path | None = None,
    config: ServiceConfig | None = None,
    log_level: str = "info",
) -> None:
    """Run the service under uvicorn until interrupted (``matching serve``); ``workers`` > 1 starts that many
    processes, each building its app from the environment (:func:`app_from_env`). ``token_file`` holds the write
    token, ``read_token_file`` the token reads then need (both read by :func:`read_token`)."""
    import uvicorn

    from matching.bundle import current_generation

    current_generation(Path(bundle))  # a missing or broken bundle fails here, not in every worker
    config = config or ServiceConfig()
    token = read_token(token_file) if token_file else None
    reads = read_token(read_token_file) if read_token_file else None  # a bad file stops here, not in each worker
    if workers == 1:
        app = create_app(bundle, token=token, read_token=reads, config=config)
        uvicorn.run(app, host=host, port=port, log_level=log_level)
        return
    os.environ[ENV_BUNDLE] = str(Path(bundle).resolve())
    os.environ[ENV_CONFIG] = json.dumps(config.to_dict())
    if token_file:
        os.environ[ENV_TOKEN] = str(Path(token_file).resolve())
    if read_token_file:
        os.environ[ENV_READ_TOKEN] = str(Path(read_token_file).resolve())
    uvicorn.run(
        "matching.service.server:app_from_env", factory=True, host=host, port=port, workers=workers, log_level=log_level
    )
