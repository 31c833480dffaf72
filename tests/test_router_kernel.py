"""The one-kernel router (kernels/router.py) against torch's softmax/top-k, run by Triton's interpreter on the CPU
(a subprocess with TRITON_INTERPRET=1) and on a GPU when there is one."""
import os
import subprocess
import sys

import pytest
import torch

from moetandem.errors import InvalidRequestError
from moetandem.kernels.router import route_topk, route_topk_reference

CASES = [(3, 64, 8, "softmax_topk", False), (2, 60, 8, "softmax_topk", True), (4, 8, 2, "softmax_topk", True),
         (2, 32, 4, "topk_softmax", False), (1, 512, 10, "softmax_topk", True), (5, 7, 1, "topk_softmax", False)]


def check(device: str, launch) -> None:
    g = torch.Generator().manual_seed(0)
    for T, E, k, rule, renorm in CASES:
        dtype = torch.bfloat16 if E <= 64 else torch.float32  # no ties among a row's largest (their order is free)
        logits = torch.randn(T, E, generator=g).to(device, dtype)
        ids, w = launch(logits, k, rule, renorm)
        rid, rw = route_topk_reference(logits, k, rule, renorm)
        assert ids.dtype == torch.long and w.dtype == torch.float32 and ids.shape == (T, k)
        assert torch.equal(ids.cpu(), rid.cpu()), (T, E, k, rule)
        torch.testing.assert_close(w.cpu(), rw.cpu(), rtol=1e-5, atol=1e-6)


INTERPRET = """
import torch
from tests.test_router_kernel import check
from moetandem.kernels.router import route_topk_op
check("cpu", route_topk_op)
print("ok")
"""


def test_kernel_matches_torch_under_the_triton_interpreter() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", INTERPRET], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_matches_torch_on_the_gpu() -> None:
    check("cuda", route_topk)


def test_cpu_path_is_torch_and_bad_input_is_refused() -> None:
    logits = torch.randn(3, 16)
    ids, w = route_topk(logits, 4, "softmax_topk", True)
    assert torch.allclose(w.sum(-1), torch.ones(3))
    with pytest.raises(InvalidRequestError, match="choose one of"):
        route_topk(logits, 4, "sigmoid")
    with pytest.raises(InvalidRequestError, match="top-k must be"):
        route_topk(logits, 17)
