"""``farm api``: serve the OpenAI-compatible HTTP API (FastAPI on uvicorn) at ``/v1``."""

from __future__ import annotations

import argparse
import sys

from protocol.errors import SettingsError
from protocol.settings import FarmSettings


def parse_args(argv: list[str] | None, settings: FarmSettings) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="farm api", description=__doc__)
    parser.add_argument("--host", default=settings.api_host, help="address to bind (FARM_API_HOST)")
    parser.add_argument("--port", type=int, default=settings.api_port, help="port (FARM_API_PORT)")
    parser.add_argument("--log-level", default="warning", help="uvicorn's log level")
    parser.add_argument("--access-log", action="store_true", help="log every request (never its key)")
    return parser.parse_args(argv)


def check_exposure(host: str, has_keys: bool) -> None:
    """Like Flower, refuse to listen beyond loopback without keys: the API spends the farm."""
    from ops.flower import is_loopback

    if not has_keys and not is_loopback(host):
        raise SettingsError(
            f"farm api would listen on {host or 'every interface'} without keys: set FARM_API_KEYS "
            "(or FARM_API_KEYS_FILE) or bind it to 127.0.0.1")


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from api.app import create_app
    from api.keys import Keys, load_keys

    try:
        settings = FarmSettings.from_env()
        args = parse_args(argv, settings)
        keys = Keys(load_keys(settings))
        check_exposure(args.host, keys.required)
    except SettingsError as error:
        print(f"farm api: {error}", file=sys.stderr)
        return 2
    print(f"farm api: http://{args.host}:{args.port}/v1 (keys {'required' if keys.required else 'off'})",
          flush=True)
    uvicorn.run(create_app(settings, keys), host=args.host, port=args.port, log_level=args.log_level,
                access_log=args.access_log, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
