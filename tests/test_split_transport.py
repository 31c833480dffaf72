"""Split transport: frame format and validation, token auth, malformed/forged frames, TLS."""
from __future__ import annotations

import moetandem
import json
import logging
import shutil
import struct
import subprocess

import grpc
import pytest
import torch
from conftest import build_checkpoint

from moetandem.errors import CloudError
from moetandem.split.cloud import CloudServer
from moetandem.split.transport import SESSION_METHOD
from moetandem.split.transport.auth import call_metadata
from moetandem.split.transport.frame import (
    MAGIC,
    Frame,
    FrameError,
    Limits,
    pack,
    unpack,
)

TOKEN = "t0k3n-for-tests-0123456789abcdef"
PROMPTS = [[5, 17, 42, 9], [3, 1, 4]]


def test_frame_roundtrip_every_dtype():
    tensors = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 2).bfloat16(),
               "i8": torch.randint(-127, 127, (4, 3), dtype=torch.int8), "i64": torch.arange(6).view(2, 3),
               "u8": torch.arange(4, dtype=torch.uint8), "b": torch.tensor([True, False]), "e": torch.zeros(0, 7)}
    f = unpack(pack(Frame("layers", 7, {"cache": 3, "codec": "off", "rank": None}, tensors)))
    assert (f.kind, f.id, f.meta) == ("layers", 7, {"cache": 3, "codec": "off", "rank": None})
    assert all(torch.equal(f.tensors[k], v) and f.tensors[k].dtype == v.dtype for k, v in tensors.items())


def _frame(header: dict, payload: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<4sI", MAGIC, len(h)) + h + payload


GOOD = {"v": 1, "kind": "layers", "id": 1, "meta": {}, "tensors": [["x", "float32", [2, 2]]]}
BAD = {
    "truncated payload": _frame(GOOD, b"\0" * 15),
    "trailing bytes": _frame(GOOD, b"\0" * 17),
    "bad magic": b"XXXX" + _frame(GOOD, b"\0" * 16)[4:],
    "header past end": struct.pack("<4sI", MAGIC, 10**6) + b"{}",
    "header not json": struct.pack("<4sI", MAGIC, 3) + b"{x}",
    "other version": _frame({**GOOD, "v": 2}, b"\0" * 16),
    "unknown kind": _frame({**GOOD, "kind": "exec"}, b"\0" * 16),
    "dtype not allowed": _frame({**GOOD, "tensors": [["x", "complex64", [2, 1]]]}, b"\0" * 16),
    "object dtype": _frame({**GOOD, "tensors": [["x", "object", [1]]]}, b"\0" * 8),
    "negative dim": _frame({**GOOD, "tensors": [["x", "float32", [-1, 4]]]}),
    "rank too high": _frame({**GOOD, "tensors": [["x", "uint8", [1] * 5]]}, b"\0"),
    "duplicate names": _frame({**GOOD, "tensors": [["x", "uint8", [1]], ["x", "uint8", [1]]]}, b"\0\0"),
    "bad name": _frame({**GOOD, "tensors": [["../x", "uint8", [1]]]}, b"\0"),
    "not a boolean": _frame({**GOOD, "tensors": [["v", "bool", [2]]]}, b"\x01\x02"),
    "extra header key": _frame({**GOOD, "pickle": True}, b"\0" * 16),
    "nested meta": _frame({**GOOD, "meta": {"a": {"b": 1}}}, b"\0" * 16),
    "too many elements": _frame({**GOOD, "tensors": [["x", "uint8", [2**20, 2**20]]]}),
}


@pytest.mark.parametrize("name", list(BAD))
def test_malformed_frames_rejected(name):
    with pytest.raises(FrameError):
        unpack(BAD[name], Limits())


def test_compact_header_round_trip_and_garbage():
    """pack() writes the compact header (MTS2); every meta value type survives; a one-token decode frame's header
    is <= 2% of the frame at hidden size 2048; truncated or mangled compact headers raise FrameError only."""
    meta = {"cache": 3, "kv_len": 1234, "neg": -(2**40), "big": 2**62, "f": 0.125, "s": "fp16", "n": None,
            "t": True, "no": False, "l": [1, -2.5, "x", None, True]}
    data = pack(Frame("layers", 2**40, meta, {"x": torch.ones(2, 3)}))
    assert data[:4] == b"MTS2"
    f = unpack(data)
    assert (f.kind, f.id, f.meta) == ("layers", 2**40, meta) and torch.equal(f.tensors["x"], torch.ones(2, 3))
    one = pack(Frame("layers", 123456, {"cache": 12, "kv_len": 1234},
                     {"pos": torch.zeros(1, 1, dtype=torch.long), "rows": torch.zeros(1, dtype=torch.long),
                      "x": torch.zeros(1, 2048, dtype=torch.float16)}))
    assert (len(one) - 2 * 2048 - 16) / len(one) <= 0.02, len(one)
    with pytest.raises(FrameError, match="cannot send"):
        pack(Frame("layers", 1, {"x": 2**70}))
    hlen = struct.unpack_from("<I", data, 4)[0]
    for cut in range(8, 8 + hlen):  # every truncation of the header (the length field says less)
        bad = data[:4] + struct.pack("<I", cut - 8) + data[8:cut] + data[8 + hlen:]
        with pytest.raises(FrameError):
            unpack(bad)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):  # random bytes in the header: FrameError, never another exception
        junk = bytes(torch.randint(0, 256, (hlen,), generator=g, dtype=torch.uint8).tolist())
        try:
            unpack(data[:8] + junk + data[8 + hlen:])
        except FrameError:
            pass


def test_oversize_frame_rejected():
    with pytest.raises(FrameError, match="exceeds"):
        unpack(pack(Frame("layers", tensors={"x": torch.zeros(1000)})), Limits(max_message_bytes=1000))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint("mixtral", tmp_path_factory.mktemp("transport"))


@pytest.fixture(scope="module")
def cloud(ckpt):
    srv = CloudServer(moetandem.load(ckpt, device="cpu", progress=False), TOKEN)
    srv.port = srv.start("127.0.0.1:0")
    yield srv
    srv.stop(0)


def raw(port: int, frames: list[bytes], metadata=None) -> tuple[list[Frame], grpc.StatusCode]:
    """Send frames on a Session stream; (replies, final status)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.stream_stream(SESSION_METHOD, request_serializer=None, response_deserializer=None)(
            iter(frames), metadata=call_metadata(TOKEN) if metadata is None else metadata, timeout=20)
        replies = []
        try:
            for r in call:
                replies.append(unpack(r))
        except grpc.RpcError as e:
            return replies, e.code()
        return replies, grpc.StatusCode.OK


@pytest.mark.parametrize("metadata", [[], [("authorization", "Bearer wrong-token-0123456789")],
                                      [("authorization", TOKEN)]], ids=["none", "wrong", "no-scheme"])
def test_auth_refused(cloud, metadata, caplog):
    hello = pack(Frame("hello", 1, {"fingerprint": cloud.fingerprint}))
    with caplog.at_level(logging.DEBUG):
        replies, code = raw(cloud.port, [hello], metadata)
    assert code == grpc.StatusCode.UNAUTHENTICATED and not replies
    assert "wrong-token" not in caplog.text and TOKEN not in caplog.text  # tokens are never logged


def test_end_with_wrong_token_is_refused(ckpt, cloud):
    with pytest.raises(CloudError, match="UNAUTHENTICATED"):
        moetandem.load(ckpt, device="cpu", progress=False, cloud=f"127.0.0.1:{cloud.port}",
                       token="not-the-token-0123456789")


def test_forged_frames_rejected_while_others_are_served(ckpt, cloud):
    ref = [g.token_ids for g in moetandem.load(ckpt, device="cpu", progress=False)
           .generate(PROMPTS, max_new_tokens=6, stop_on_eos=False)]
    eng = moetandem.load(ckpt, device="cpu", progress=False, cloud=f"127.0.0.1:{cloud.port}", token=TOKEN)
    split = eng.split
    gen = lambda: [g.token_ids for g in eng.generate(PROMPTS, max_new_tokens=6, stop_on_eos=False)]
    assert gen() == ref
    hello = pack(Frame("hello", 1, {"fingerprint": cloud.fingerprint}))
    alloc = pack(Frame("alloc", 2, {"cache": 1, "rows": 2, "max_len": 16, "start": 1, "end": 2, "codec": "off"}))
    x = torch.zeros(1, 64)
    layers = lambda **kw: pack(Frame("layers", 3, {"cache": 1, "kv_len": 4, **kw.pop("meta", {})}, {
        "pos": torch.tensor([[3]]), "rows": torch.tensor([0]), "x": x, **kw}))
    attacks = {
        "garbage": [b"\x00" * 64],
        "before hello": [alloc],
        "wrong checkpoint": [pack(Frame("hello", 1, {"fingerprint": "someone-else"}))],
        "unallocated cache": [hello, layers()],
        "row out of range": [hello, alloc, layers(rows=torch.tensor([5]))],
        "position past kv_len": [hello, alloc, layers(pos=torch.tensor([[9]]))],
        "hidden of wrong width": [hello, alloc, layers(x=torch.zeros(1, 3))],
        "NaN hidden": [hello, alloc, layers(x=torch.full((1, 64), float("nan")))],
        "huge cache": [hello, pack(Frame("alloc", 2, {"cache": 1, "rows": 10**9, "max_len": 16, "start": 0,
                                                      "end": 1, "codec": "off"}))],
        "layer range past the model": [hello, pack(Frame("alloc", 2, {"cache": 1, "rows": 1, "max_len": 8,
                                                                      "start": 0, "end": 99, "codec": "off"}))],
        "experts on the session stream": [hello, pack(Frame("experts", 2, {"layer": 0}))],
        "short payload": [hello, alloc, layers()[:-8]],
    }
    for name, frames in attacks.items():
        _, code = raw(cloud.port, frames)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, name
        assert gen() == ref, name  # the honest end keeps being served by the cloud
    assert split.stats["fallbacks"] == 0 and split.stats["local_forwards"] == 0
    assert cloud.stats.rejected >= len(attacks)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls(ckpt, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    srv = CloudServer(moetandem.load(ckpt, device="cpu", progress=False), TOKEN)
    port = srv.start("127.0.0.1:0", tls_cert=cert, tls_key=key)
    try:
        eng = moetandem.load(ckpt, device="cpu", progress=False, cloud=f"localhost:{port}", token=TOKEN,
                             split={"tls_ca": str(cert)})
        split = eng.split
        eng.generate(PROMPTS, max_new_tokens=3, stop_on_eos=False)
        assert split.stats["cloud_forwards"] == 3
        _, code = raw(port, [pack(Frame("hello", 1, {"fingerprint": srv.fingerprint}))])  # plain TCP: refused
        assert code != grpc.StatusCode.OK
    finally:
        srv.stop(0)
