"""TLS for the gRPC servers and channels, from PEM files (what a Kubernetes TLS Secret or cert-manager mounts).

A server reads its certificate again before a handshake whenever the files changed, so a rotated Secret serves new
connections without a restart. With a client CA it requires and checks a client certificate (mutual TLS: how
workers know the router). A channel's files are read when it is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from nanocp.auth import WatchedFile


@dataclass(frozen=True)
class ServerTls:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: callers must present a certificate this CA signed

    def credentials(self) -> grpc.ServerCredentials:
        files = [WatchedFile(p) for p in (self.cert, self.key, self.client_ca) if p is not None]

        def configuration() -> grpc.ServerCertificateConfiguration:
            cert, key, *ca = (f.read() for f in files)
            return grpc.ssl_server_certificate_configuration([(key, cert)], ca[0] if ca else None)

        def fetch() -> grpc.ServerCertificateConfiguration | None:  # grpc asks before each new connection
            return configuration() if any([f.changed() for f in files]) else None

        return grpc.dynamic_ssl_server_credentials(
            configuration(), fetch, require_client_authentication=self.client_ca is not None
        )


@dataclass(frozen=True)
class ChannelTls:
    ca: Path | None = None  # None: the system's roots
    cert: Path | None = None  # with `key`: this side's certificate, for servers that require one
    key: Path | None = None
    server_name: str | None = None  # the name to check the server's certificate for, when not its address

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs both its certificate and its key file")
        return grpc.ssl_channel_credentials(
            self.ca.read_bytes() if self.ca else None,
            self.key.read_bytes() if self.key else None,
            self.cert.read_bytes() if self.cert else None,
        )

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def aio_channel(
    target: str, tls: ChannelTls | None, interceptors: list[grpc.aio.ClientInterceptor] | None = None
) -> grpc.aio.Channel:
    """A grpc.aio channel to `target`, over TLS when `tls` is given."""
    if tls is None:
        return grpc.aio.insecure_channel(target, interceptors=interceptors)
    return grpc.aio.secure_channel(target, tls.credentials(), tls.options(), interceptors=interceptors)
