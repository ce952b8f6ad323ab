"""The Triton kernels of the MoVE mix, run on the CPU by Triton's interpreter."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("triton")


def test_triton_kernels_match_reference_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "tests/scripts/kernels_interpret.py")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    worst = float(out.stdout.split("WORST")[1])
    assert worst < 1e-5, worst


@pytest.mark.gpu
def test_triton_kernels_on_gpu():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from movegen.move import mix_reference

    torch.manual_seed(0)
    B, T, H, M, D = 4, 64, 12, 24, 64
    v = torch.randn(B, T, 3, H, D, device="cuda", dtype=torch.bfloat16)[:, :, 2]
    gates = 2 * torch.rand(B, T, H, M + 1, device="cuda", dtype=torch.bfloat16)
    memh = torch.randn(B, T, H, M, D, device="cuda", dtype=torch.bfloat16)
    out = torch.ops.movegen.mix_fwd(v, gates, memh, True).float()
    ref = mix_reference(v.double(), gates.double(), memh.transpose(2, 3).double(), True)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2
