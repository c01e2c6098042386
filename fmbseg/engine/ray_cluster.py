"""Connecting to Ray: a short up-front check of ``runtime.ray_address``, then ``ray.init``.

``ray.init`` retries an unreachable GCS or Ray Client server for half a minute or more,
and a cluster that requires token authentication rejects a client without the token with
a long log that ends in "Failed to connect". :func:`check_ray_address` asks the address
one question with a short timeout instead (the GCS for ``host:port``, the Ray Client
server for ``ray://``), through Ray's own gRPC channel, which adds the client's token when
it has one, and raises :class:`RayAddressError` with one line saying what is wrong.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0  # for the channel to connect and for the one request
CLIENT_PREFIX = "ray://"
CLIENT_PORT = 10001  # Ray Client's default port (``ray://host`` without one)
TOKEN_HINT = (
    "set RAY_AUTH_MODE=token and give the cluster's token (RAY_AUTH_TOKEN, "
    "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
)


class RayAddressError(ConnectionError):
    """``runtime.ray_address`` names no reachable Ray cluster this client may use."""


def _host_port(address: str, default_port: int | None) -> tuple[str, int]:
    rest = address.removeprefix(CLIENT_PREFIX).strip().rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or "]" in port:  # no port (an IPv6 literal's colons are inside [...])
        host, port = rest, ""
    host = host.strip("[]")
    if host and not port and default_port is not None:
        return host, default_port
    if not host or not port.isdigit():
        raise RayAddressError(
            f"ray address {address!r}: expected 'auto', 'HOST:PORT' (the head's GCS port, "
            f"6379 by default) or 'ray://HOST:PORT' (Ray Client, {CLIENT_PORT} by default)"
        )
    return host, int(port)


def check_ray_address(address: str | None, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise :class:`RayAddressError` unless ``address`` answers as a Ray cluster would.

    ``None``/``"local"`` (a Ray started in this process) need no check; ``"auto"`` is the
    cluster ``ray start`` recorded on this machine (or ``RAY_ADDRESS``). Takes at most
    ``2 * timeout_s``.
    """
    if address is None or address == "local":
        return
    import grpc
    from ray._private.grpc_utils import init_grpc_channel

    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address_or_die

        try:
            target = canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError as exc:
            raise RayAddressError(f"ray address 'auto': {exc}") from None
    else:
        target = address
    client = target.startswith(CLIENT_PREFIX)
    host, port = _host_port(target, CLIENT_PORT if client else None)
    where = f"ray address {address!r}" + (f" ({host}:{port})" if address == "auto" else "")
    channel = init_grpc_channel(f"{host}:{port}", options=[], asynchronous=False)
    try:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
            _ask(channel, client, timeout_s)
        except grpc.FutureTimeoutError:
            raise RayAddressError(
                f"{where}: nothing answered within {timeout_s:g} s "
                "(is the cluster running, and the port open to this machine?)"
            ) from None
        except grpc.RpcError as exc:
            raise RayAddressError(f"{where}: {_explain(exc, client)}") from None
    finally:
        channel.close()


def _ask(channel: Any, client: bool, timeout_s: float) -> None:
    """One cheap request: the Ray Client server's ping, or the GCS's cluster id."""
    if client:
        import ray.core.generated.ray_client_pb2 as client_pb
        import ray.core.generated.ray_client_pb2_grpc as client_grpc

        # generated protobuf modules: no type stubs
        ping = client_pb.ClusterInfoRequest(type=client_pb.ClusterInfoType.PING)  # type: ignore[attr-defined]
        client_grpc.RayletDriverStub(channel).ClusterInfo(ping, timeout=timeout_s)
    else:
        import ray.core.generated.gcs_service_pb2 as gcs_pb
        import ray.core.generated.gcs_service_pb2_grpc as gcs_grpc

        stub = gcs_grpc.NodeInfoGcsServiceStub(channel)
        stub.GetClusterId(gcs_pb.GetClusterIdRequest(), timeout=timeout_s)  # type: ignore[attr-defined]


def _explain(exc: Any, client: bool) -> str:
    import grpc

    code = exc.code()
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if _has_token():
            return (
                f"the cluster rejected this client's token; give the cluster's token ({TOKEN_HINT})"
            )
        return f"the cluster requires token authentication; {TOKEN_HINT}"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        if client:
            return "this port is not a Ray Client server (a GCS port? drop 'ray://')"
        return "this port is not a Ray GCS (a Ray Client port? use 'ray://HOST:PORT')"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "no answer in time (is the cluster running, and the port open to this machine?)"
    return f"not reachable ({code.name}: {exc.details()})"


def _has_token() -> bool:
    """Whether this client sends a token (token mode on and a token found)."""
    from ray._raylet import (  # type: ignore[attr-defined]  # not in ray's stub
        AuthenticationMode,
        AuthenticationTokenLoader,
        get_authentication_mode,
    )

    return (
        get_authentication_mode() == AuthenticationMode.TOKEN
        and AuthenticationTokenLoader.instance().has_token()
    )


def connect(address: str | None) -> None:
    """``ray.init(address)`` after :func:`check_ray_address`; nothing when Ray is already up."""
    import ray

    if ray.is_initialized():
        return
    check_ray_address(address)
    ray.init(address=address)
