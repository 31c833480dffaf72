"""gRPC transport of split execution: frames (frame.py), bearer-token auth and TLS (auth.py), the end's
stream client (client.py) and the cloud's stream handler (server.py)."""
from moetandem.split.transport.frame import Frame, FrameError, Limits, pack, unpack

SERVICE = "moetandem.split.v1.Split"
SESSION_METHOD = f"/{SERVICE}/Session"  # stateful: a layer range with its own KV cache
EXPERTS_METHOD = f"/{SERVICE}/Experts"  # stateless: Σ w·E(x) for experts placed in the cloud

__all__ = ["EXPERTS_METHOD", "SERVICE", "SESSION_METHOD", "Frame", "FrameError", "Limits", "pack", "unpack"]
