"""The cloud's batching across ends, measured on the cloud alone: S sessions (threads, in this process, no network
and no end compute) each prefill a prompt and then send decode exchanges (one token) for layers [1, L-1), as
ends with 1 head + 1 tail layer would; exchanges/s with batching off (`--batch-max-rows 1`) and on.

    python bench/cloud_batching.py --model DIR --device cuda --sessions 1,4,16 [--steps 64] [--window-ms 1]

Prints a table (sessions, exchanges/s off, on, exchanges per forward, speed-up) and checks that every session's
replies match between the two runs (max abs difference). End-to-end over gRPC with real ends:
`bench/scaleout.py --configs nobatch,one`."""
from __future__ import annotations

import argparse
import threading
import time

import torch

import moetandem
from moetandem.config import CloudBatchConfig
from moetandem.split.cloud import CloudServer
from moetandem.split.cloud_session import CloudSession
from moetandem.split.transport.frame import Frame


def run(eng, sessions: int, steps: int, prompt: int, batching: CloudBatchConfig) -> tuple[float, float, list]:
    """exchanges/s, exchanges per forward, each session's replies."""
    H, L = eng.args.hidden_size, eng.args.num_layers
    srv = CloudServer(eng, "t" * 32, max_sessions=sessions, batching=batching)
    gen = torch.Generator().manual_seed(0)
    xs = [[torch.randn(1, H, generator=gen) for _ in range(steps)] for _ in range(sessions)]
    ss = []
    for i in range(sessions):
        s = CloudSession(srv, "Session")
        s.handle(Frame("hello", meta={"fingerprint": srv.fingerprint}))
        s.handle(Frame("alloc", meta={"cache": 1, "rows": 1, "max_len": prompt + steps, "start": 1, "end": L - 1}))
        s.handle(Frame("layers", meta={"cache": 1, "kv_len": prompt}, tensors={
            "pos": torch.arange(prompt)[None], "rows": torch.tensor([0]), "x": torch.randn(prompt, H, generator=gen)}))
        ss.append(s)
    out: list[list[torch.Tensor]] = [[] for _ in range(sessions)]

    def one(i: int) -> None:
        for t in range(steps):
            f = Frame("layers", meta={"cache": 1, "kv_len": prompt + t + 1}, tensors={
                "pos": torch.tensor([[prompt + t]]), "rows": torch.tensor([0]), "x": xs[i][t]})
            out[i].append(ss[i].handle(f).tensors["x"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(sessions)]
    if eng.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    per = srv.batch_stats().get("exchanges_per_forward", 1.0)
    srv.stop(0)
    return sessions * steps / dt, per, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--sessions", default="1,4,16")
    ap.add_argument("--steps", type=int, default=64, help="decode exchanges per session")
    ap.add_argument("--prompt", type=int, default=64, help="prefill tokens per session")
    ap.add_argument("--window-ms", type=float, default=CloudBatchConfig.window_ms)
    ap.add_argument("--max-rows", type=int, default=CloudBatchConfig.max_rows)
    a = ap.parse_args()
    eng = moetandem.load(a.model, device=a.device, dtype=a.dtype, progress=False)
    run(eng, 1, 4, a.prompt, CloudBatchConfig(max_rows=1))  # warm-up
    print("| sessions | off exch/s | on exch/s | exchanges per forward | × | max abs diff |\n|---|---|---|---|---|---|")
    for n in (int(x) for x in a.sessions.split(",")):
        off, _, y_off = run(eng, n, a.steps, a.prompt, CloudBatchConfig(max_rows=1))
        on, per, y_on = run(eng, n, a.steps, a.prompt, CloudBatchConfig(a.window_ms, a.max_rows))
        diff = max(float((p.float() - q.float()).abs().max()) for ps, qs in zip(y_off, y_on) for p, q in zip(ps, qs))
        print(f"| {n} | {off:.1f} | {on:.1f} | {per:.2f} | {on / off:.2f} | {diff:.2e} |", flush=True)


if __name__ == "__main__":
    main()
