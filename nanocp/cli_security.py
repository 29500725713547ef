"""The command line's TLS, token and shutdown flags, and what they build (nanocp.auth, nanocp.tls)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
from pathlib import Path

from nanocp.auth import BearerAuth, TokenFile
from nanocp.tls import ChannelTls, ServerTls

# Matched to the chart's terminationGracePeriodSeconds, which leaves a few seconds more for the process to exit.
SHUTDOWN_GRACE_S = 30.0


def add_shutdown_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=SHUTDOWN_GRACE_S,
        help="on SIGTERM or SIGINT: seconds the live streams get to finish before they are cancelled (default "
        f"{SHUTDOWN_GRACE_S:g}); a second signal stops at once",
    )


def add_server_tls_flags(parser: argparse.ArgumentParser, mutual: bool) -> None:
    parser.add_argument("--tls-cert", type=Path, default=None, help="serve TLS with this PEM certificate (chain)")
    parser.add_argument("--tls-key", type=Path, default=None, help="the PEM private key of --tls-cert")
    if mutual:
        parser.add_argument(
            "--tls-client-ca",
            type=Path,
            default=None,
            help="mutual TLS: callers must present a certificate this PEM CA signed (the router's)",
        )


def add_internal_token_flag(parser: argparse.ArgumentParser, sends: bool) -> None:
    role = "sent to the workers" if sends else "every caller but a health check must present"
    parser.add_argument(
        "--internal-token-file",
        type=Path,
        default=os.environ.get("NANOCP_INTERNAL_TOKEN_FILE") or None,
        help=f"a file holding the internal API's shared token, {role}; read again when it changes "
        "(default $NANOCP_INTERNAL_TOKEN_FILE, else none)",
    )


def add_router_security_flags(parser: argparse.ArgumentParser) -> None:
    add_server_tls_flags(parser, mutual=False)
    parser.add_argument(
        "--api-tokens",
        type=Path,
        default=None,
        help="a file of client tokens, one a line: the public API then needs `authorization: Bearer <token>`, "
        "and a client sees and aborts only its own requests (default: no tokens, anyone may)",
    )
    parser.add_argument(
        "--admin-tokens", type=Path, default=None, help="a file of admin tokens: they see and abort every request"
    )
    add_internal_token_flag(parser, sends=True)
    parser.add_argument("--worker-tls-ca", type=Path, default=None, help="connect to workers over TLS: their CA")
    parser.add_argument("--worker-tls-cert", type=Path, default=None, help="mutual TLS: the router's certificate")
    parser.add_argument("--worker-tls-key", type=Path, default=None, help="mutual TLS: its key")
    parser.add_argument(
        "--worker-tls-server-name",
        default=None,
        help="the name the workers' certificate is checked for (workers are dialled by IP), e.g. nanocp-worker",
    )


def add_client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token", default=os.environ.get("NANOCP_TOKEN") or None, help="the bearer token (default $NANOCP_TOKEN)"
    )
    parser.add_argument("--tls", action="store_true", help="connect over TLS (system roots unless --ca-file)")
    parser.add_argument("--ca-file", type=Path, default=None, help="PEM roots of the router's certificate; sets --tls")
    parser.add_argument(
        "--server-name", default=None, help="the name the router's certificate holds, when --router is another"
    )


def server_tls(args: argparse.Namespace) -> ServerTls | None:
    if args.tls_cert is None and args.tls_key is None:
        if getattr(args, "tls_client_ca", None) is not None:
            raise SystemExit("error: --tls-client-ca needs --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise SystemExit("error: TLS needs both --tls-cert and --tls-key")
    return ServerTls(args.tls_cert, args.tls_key, getattr(args, "tls_client_ca", None))


def _token_file(path: Path | None, flag: str) -> TokenFile | None:
    try:
        return TokenFile(path) if path is not None else None
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {flag}: {exc}") from None


def internal_token(args: argparse.Namespace) -> TokenFile | None:
    return _token_file(args.internal_token_file, "--internal-token-file")


def public_auth(args: argparse.Namespace) -> BearerAuth:
    auth = BearerAuth(_token_file(args.api_tokens, "--api-tokens"), _token_file(args.admin_tokens, "--admin-tokens"))
    if not auth.enabled and not _loopback(args.host):
        logging.getLogger("nanocp").warning(
            "the public API on %s takes no tokens: whoever reaches it may list and abort every request "
            "(--api-tokens, --admin-tokens)",
            args.host,
        )
    return auth


def _loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False  # unknown: warn as for every interface


def worker_tls(args: argparse.Namespace) -> ChannelTls | None:
    if args.worker_tls_ca is None and args.worker_tls_cert is None and args.worker_tls_key is None:
        return None
    if (args.worker_tls_cert is None) != (args.worker_tls_key is None):
        raise SystemExit("error: mutual TLS needs both --worker-tls-cert and --worker-tls-key")
    return ChannelTls(args.worker_tls_ca, args.worker_tls_cert, args.worker_tls_key, args.worker_tls_server_name)
