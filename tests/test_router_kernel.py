"""The one-kernel router (kernels/router.py) against torch's softmax/top-k, run by Triton's interpreter on the CPU
(in this process under TRITON_INTERPRET=1, else in a child process that sets it) and on a GPU when there is one."""
import os

import pytest
import torch

from moetandem.errors import InvalidRequestError
from kernel_checks import run_interpreted
from moetandem.kernels.router import route_topk, route_topk_op, route_topk_reference

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


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (see below)")
def test_triton_interpreter_kernel_matches_torch() -> None:
    pytest.importorskip("triton")
    check("cpu", route_topk_op)


def test_triton_interpreter_subprocess() -> None:
    """The interpreter test above in a child process, so a plain `pytest` run checks the kernel too."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("runs in this process")
    run_interpreted(__file__, "triton_interpreter and not subprocess")


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
