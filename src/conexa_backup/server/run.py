"""``conexa-backup serve``: check the config, build the app, run uvicorn until a signal."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import uvicorn

from conexa_backup.config.models import Config
from conexa_backup.config.server import split_listen
from conexa_backup.errors import ConexaError
from conexa_backup.logs import LOGGER
from conexa_backup.server.app import create_app
from conexa_backup.server.auth import verify_startup
from conexa_backup.server.services import Services

_log = logging.getLogger(LOGGER)


def serve(config: Config, config_path: Path, listen: str | None = None) -> None:
    """Serve the API on ``listen`` (default: ``[server] listen``) until SIGINT or SIGTERM.

    Raises:
        ConfigError: no ``[server]``, an address the config's rules refuse, an unreadable
            secret or key (:func:`auth.verify_startup`).
        ConexaError: the address cannot be bound.
    """
    verify_startup(config, listen)
    assert config.server is not None  # verify_startup insists
    server = config.server
    host, port = split_listen(listen or server.listen)
    app = create_app(Services.build(config, config_path))
    scheme = "https" if server.tls_cert_file else "http"
    _log.info("serving the API on %s://%s:%d", scheme, host, port)
    uv = uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, log_config=None, access_log=True,
        ssl_certfile=server.tls_cert_file, ssl_keyfile=server.tls_key_file,
        server_header=False, timeout_graceful_shutdown=10,
        # X-Forwarded-For/-Proto only from the configured proxies (uvicorn would otherwise
        # trust 127.0.0.1, or $FORWARDED_ALLOW_IPS, by default).
        proxy_headers=bool(server.trusted_proxies),
        forwarded_allow_ips=list(server.trusted_proxies) or None))
    try:
        uv.run()
    except SystemExit:  # uvicorn exits when it cannot bind; say where, once
        raise ConexaError(f"cannot serve on {host}:{port} (address in use, or not "
                          f"this host's?)") from None
    except KeyboardInterrupt:  # uvicorn stopped on SIGINT/SIGTERM, then raised it again
        pass
    _log.info("stopped")
    _leave_stuck_threads()


def _leave_stuck_threads() -> None:
    """Exit now if request threads still wait on a target that stopped answering (a read
    can take minutes to time out): Python would wait for them at exit, and a service
    manager would then SIGKILL us. They hold nothing to clean up: answers are gone with
    the connections, jobs are processes of their own, the audit log is written as it goes.
    """
    stuck = [t for t in threading.enumerate()
             if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if stuck:
        _log.warning("%d request thread(s) still wait on a target: exiting without them",
                     len(stuck))
        logging.shutdown()
        os._exit(0)


def log_to_stderr() -> None:
    """Our log and uvicorn's (one line per request) on stderr: a daemon's journal."""
    ours = logging.getLogger(LOGGER)
    if any(isinstance(h, logging.StreamHandler) for h in ours.handlers):
        ours.propagate = False  # --verbose already prints ours (at DEBUG): not twice
    elif ours.level == logging.NOTSET:
        ours.setLevel(logging.INFO)
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
