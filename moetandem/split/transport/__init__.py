"""gRPC transport of split execution: frames (frame.py), bearer-token auth and TLS (auth.py), the end's
stream client (client.py) and the cloud's stream handler (server.py)."""
from moetandem.split.transport.frame import Frame, FrameError, Limits, pack, unpack

SERVICE = "moetandem.split.v1.Split"
SESSION_METHOD = f"/{SERVICE}/Session"  # stateful: a layer range with its own KV cache
EXPERTS_METHOD = f"/{SERVICE}/Experts"  # stateless: Σ w·E(x) for experts placed in the cloud


def client_keepalive(interval_s: float, timeout_s: float) -> list[tuple[str, int]]:
    """Channel options of the end: an HTTP/2 PING every interval_s of silence, also while a reply is awaited, and the
    connection is dropped when one is not acknowledged within timeout_s. gRPC's own threads acknowledge pings (no
    Python, no GIL), so a busy cloud still answers them; a frozen one (SIGSTOP, a dead link without RST) does not:
    every exchange in flight fails at once, whatever its deadline (a cold link, a long prefill). 0 turns them off."""
    if interval_s <= 0:
        return []
    ms = max(1, int(timeout_s * 1000))
    return [("grpc.keepalive_time_ms", max(1, int(interval_s * 1000))), ("grpc.keepalive_timeout_ms", ms),
            ("grpc.http2.ping_timeout_ms", ms),  # pings sent while data flows have their own timeout (default 1 min)
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]


#: the cloud's side: accept the ends' frequent pings (gRPC's default answers pings more often than every 5 min with
#: GOAWAY "too_many_pings")
SERVER_KEEPALIVE = [("grpc.keepalive_permit_without_calls", 1),
                    ("grpc.http2.min_recv_ping_interval_without_data_ms", 100),
                    ("grpc.http2.min_ping_interval_without_data_ms", 100), ("grpc.http2.max_ping_strikes", 0)]

__all__ = ["EXPERTS_METHOD", "SERVER_KEEPALIVE", "SERVICE", "SESSION_METHOD", "Frame", "FrameError", "Limits",
           "client_keepalive", "pack", "unpack"]
