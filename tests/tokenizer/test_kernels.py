"""The Triton nearest-code kernel against the chunked search, interpreted on the CPU.

Triton reads TRITON_INTERPRET when a kernel is defined, so the kernels run in one subprocess
(this file run as a script) that starts with the variable set; the tests check its answers.
Interpreting is slow: sizes stay tiny, and 16-wide tiles make them span several tiles in N, K, D.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from vqgpt.tokenizer.quantize import nearest_code

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (pip install -e '.[dev]' brings it; CI installs it)",
)

TILES = (16, 16, 16)  # BLOCK_N, BLOCK_K, BLOCK_D: the smallest tl.dot takes
# (N, K, D): none a multiple of 16 except D=256, which spans 16 D slices of the tile
SIZES = [(37, 41, 3), (37, 41, 8), (37, 41, 40), (21, 35, 256)]


def _inputs(n: int, k: int, d: int, ties: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random float rows, or small integers (exact float32 arithmetic, many exact ties) whose
    codebook's second half repeats its first half (duplicate rows, in later K tiles)."""
    g = torch.Generator().manual_seed(seed)
    if not ties:
        return torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    x = torch.randint(-2, 3, (n, d), generator=g).float()
    e = torch.randint(-1, 2, (k, d), generator=g).float()
    half = k // 2
    e[k - half :] = e[:half]
    return x, e


def _cases() -> list[dict]:
    cases = []
    for n, k, d in SIZES:
        for ties in (False, True):
            for fast in (False, True):
                cases.append(dict(n=n, k=k, d=d, ties=ties, fast=fast, blocks=TILES, seed=d))
    # default tiles (64, 64, 32): one tile holds all rows and codes; K == 1
    cases.append(dict(n=50, k=70, d=40, ties=True, fast=False, blocks=None, seed=1))
    cases.append(dict(n=5, k=1, d=8, ties=False, fast=True, blocks=TILES, seed=2))
    return cases


def _worker() -> dict:
    """In the TRITON_INTERPRET=1 subprocess: every case's kernel indices, and the dispatch."""
    import vqgpt.tokenizer.kernels as kernels

    results = []
    for case in _cases():
        x, e = _inputs(case["n"], case["k"], case["d"], case["ties"], case["seed"])
        codes = kernels.nearest_code_triton(x, e, fast=case["fast"], blocks=case["blocks"])
        results.append(dict(case=case, codes=codes.tolist()))
    # nearest_code dispatches to the kernel when asked (argument or environment), not otherwise
    calls = []
    original = kernels.nearest_code_triton
    kernels.nearest_code_triton = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    x, e = _inputs(30, 20, 8, ties=True, seed=3)
    chunked = nearest_code(x, e, 7, backend="chunked").tolist()
    forced = nearest_code(x, e, 7, backend="triton").tolist()
    auto_calls = len(calls)
    nearest_code(x, e, 7)  # auto on CPU: chunked
    os.environ["VQGPT_NEAREST_CODE"] = "triton"
    by_env = nearest_code(x, e, 7).tolist()
    dispatch = dict(chunked=chunked, forced=forced, by_env=by_env, calls=len(calls))
    dispatch["calls_before_auto"] = auto_calls
    return dict(results=results, dispatch=dispatch)


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("VQGPT_NEAREST_CODE", None)
    proc = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _min_count(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Per row: how many codes reach the smallest float64 score (> 1: an exact tie)."""
    scores = e.double().pow(2).sum(1) - 2 * x.double() @ e.double().T  # (N, K)
    return (scores == scores.min(dim=1, keepdim=True).values).sum(dim=1)


def _margin(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Per row: the float64 gap between the best and second-best score (0 on a tie)."""
    scores = e.double().pow(2).sum(1) - 2 * x.double() @ e.double().T
    if scores.shape[1] == 1:
        return torch.full((scores.shape[0],), float("inf"), dtype=torch.float64)
    two = scores.topk(2, dim=1, largest=False).values
    return two[:, 1] - two[:, 0]


@needs_triton
def _case_id(case: dict) -> str:
    kind = ("ties" if case["ties"] else "rand") + ("-fast" if case["fast"] else "-exact")
    tiles = "tiles16" if case["blocks"] else "default-tiles"
    return f"N{case['n']}-K{case['k']}-D{case['d']}-{kind}-{tiles}"


@pytest.mark.parametrize("index", range(len(_cases())), ids=[_case_id(c) for c in _cases()])
def test_kernel_matches_chunked_search(interpreted, index):
    result = interpreted["results"][index]
    case = result["case"]
    x, e = _inputs(case["n"], case["k"], case["d"], case["ties"], case["seed"])
    got = torch.tensor(result["codes"])
    want = nearest_code(x, e, chunk_size=8, backend="chunked")
    assert got.shape == want.shape == (case["n"],)
    if case["ties"]:
        # integers: every score is exact, so the indices must agree everywhere, ties included;
        # and the case must hold ties that only the lowest-index rule resolves
        assert (_min_count(x, e) > 1).sum() >= 3
        assert got.tolist() == want.tolist()
    else:
        # floats: summation order may flip a near-tie only; none is that close at these sizes
        decisive = _margin(x, e) > 1e-4
        assert decisive.float().mean() > 0.9
        assert got[decisive].tolist() == want[decisive].tolist()


@needs_triton
def test_nearest_code_dispatches_to_the_kernel(interpreted):
    dispatch = interpreted["dispatch"]
    assert dispatch["forced"] == dispatch["chunked"]
    assert dispatch["by_env"] == dispatch["chunked"]
    # backend="triton" called it once; auto on CPU did not; the environment variable did
    assert dispatch["calls_before_auto"] == 1
    assert dispatch["calls"] == 2


def test_backend_choice_on_cpu(monkeypatch):
    from vqgpt.tokenizer.quantize import SEARCH_BACKEND_ENV, SearchBackend, _search_backend

    monkeypatch.delenv(SEARCH_BACKEND_ENV, raising=False)
    x = torch.zeros(2, 3)
    # auto: triton only for CUDA tensors
    assert _search_backend(x, None) == SearchBackend("chunked", forced=False)
    assert _search_backend(x, "triton") == SearchBackend("triton", forced=True)
    monkeypatch.setenv(SEARCH_BACKEND_ENV, "triton")
    assert _search_backend(x, None) == SearchBackend("triton", forced=True)
    assert _search_backend(x, "chunked").name == "chunked"  # the argument beats the environment
    with pytest.raises(ValueError, match="unknown"):
        _search_backend(x, "cuda")


def test_a_failing_kernel_falls_back_with_one_warning(monkeypatch):
    """A GPU whose triton cannot compile or launch the kernel: "auto" warns once, then searches
    with the chunked path (same codes) for the rest of the process; a forced "triton" raises."""
    import warnings

    from vqgpt.tokenizer import kernels, quantize

    monkeypatch.delenv(quantize.SEARCH_BACKEND_ENV, raising=False)
    monkeypatch.setattr(quantize, "_triton_failure", "")
    monkeypatch.setattr(quantize, "_kernel_can_run", lambda x: True)  # as on a CUDA machine
    calls = []

    def broken(x, codebook, **kw):
        calls.append(1)
        raise RuntimeError("PTX JIT compilation failed\n(long compiler log)")

    monkeypatch.setattr(kernels, "nearest_code_triton", broken)
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(50, 6, generator=g), torch.randn(17, 6, generator=g)
    want = quantize.nearest_code(x, e, 7, backend="chunked")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = quantize.nearest_code(x, e, 7)
        second = quantize.nearest_code(x, e, 7)
    assert torch.equal(first, want) and torch.equal(second, want)
    assert calls == [1]  # tried once, never again in this process
    assert len(caught) == 1 and caught[0].category is RuntimeWarning
    message = str(caught[0].message)
    assert "PTX JIT compilation failed" in message and "chunked" in message
    assert "long compiler log" not in message  # one line
    assert quantize._search_backend(x, None).name == "chunked"
    with pytest.raises(RuntimeError, match="PTX"):  # asked for by name: no silent fallback
        quantize.nearest_code(x, e, 7, backend="triton")


@needs_triton
def test_a_real_triton_compile_failure_falls_back_with_one_warning(monkeypatch, tmp_path):
    """No stand-in error: triton's real compiler builds the kernel for an H100 (sm_90, no GPU
    needed to compile) through a broken assembler, and the PTXASError it raises is what "auto"
    falls back on (the launch itself needs a GPU: the CUDA test below does it on one)."""
    import warnings

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vqgpt.tokenizer import kernels, quantize

    monkeypatch.delenv(quantize.SEARCH_BACKEND_ENV, raising=False)
    monkeypatch.setattr(quantize, "_triton_failure", "")
    monkeypatch.setattr(quantize, "_kernel_can_run", lambda x: True)  # as on a CUDA machine
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    break_ptxas(monkeypatch, tmp_path)
    pointers = dict.fromkeys(["x_ptr", "e_ptr", "e_sq_ptr"], "*fp32") | {"out_ptr": "*i64"}
    sizes = dict.fromkeys(["n", "k", "d", "stride_xn", "stride_ek"], "i32")
    tiles = {"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_D": 16}
    source = ASTSource(
        fn=kernels._nearest_code_kernel,
        signature=pointers | sizes | dict.fromkeys(tiles, "constexpr"),
        constexprs=tiles,
    )

    def compile_for_sm90(x, codebook, **kw):
        triton.compile(source, target=GPUTarget("cuda", 90, 32))
        raise AssertionError("the kernel compiled past the broken assembler")

    monkeypatch.setattr(kernels, "nearest_code_triton", compile_for_sm90)
    x, e = _inputs(40, 30, 5, ties=True, seed=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = quantize.nearest_code(x, e, 7)
        second = quantize.nearest_code(x, e, 7)
    want = quantize.nearest_code(x, e, 7, backend="chunked")
    assert torch.equal(first, want) and torch.equal(second, want)
    runtime = [w for w in caught if w.category is RuntimeWarning]
    assert len(runtime) == 1, [str(w.message) for w in caught]
    assert "PTXASError" in str(runtime[0].message)


@needs_triton
def test_kernel_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from vqgpt.tokenizer.kernels import nearest_code_triton

    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        nearest_code_triton(torch.zeros(4, 8), torch.zeros(3, 8))
    with pytest.raises(ValueError, match=r"x \[N, D\]"):
        nearest_code_triton(torch.zeros(4, 8), torch.zeros(3, 5))


# -- on a real GPU (skipped without CUDA; run by scripts/gpu_checks.sh on the lent machine) --------

needs_cuda = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not torch.cuda.is_available(),
    reason="needs a CUDA GPU and triton",
)
# (N, K, D): several tiles in N and K, ragged everywhere, the D's of the recipes and the benchmark
CUDA_SIZES = [
    (4099, 1031, 3),
    (4099, 1031, 8),
    (4099, 16384, 8),
    (2053, 4097, 40),
    (2053, 16384, 256),
]


@needs_cuda
@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
@pytest.mark.parametrize("ties", [False, True], ids=["rand", "ties"])
@pytest.mark.parametrize("size", CUDA_SIZES, ids=lambda s: "N{}-K{}-D{}".format(*s))
def test_kernel_on_cuda_matches_chunked_search(size, ties, fast):
    from vqgpt.tokenizer.kernels import nearest_code_triton

    n, k, d = size
    x, e = _inputs(n, k, d, ties, seed=d)
    want = nearest_code(x, e, chunk_size=512, backend="chunked")  # on the CPU
    got = nearest_code_triton(x.cuda(), e.cuda(), fast=fast).cpu()
    auto = nearest_code(x.cuda(), e.cuda(), chunk_size=512).cpu()
    from vqgpt.tokenizer.quantize import KERNEL_MAX_DIM, _search_backend

    assert _search_backend(x.cuda(), None).name == ("triton" if d <= KERNEL_MAX_DIM else "chunked")
    assert got.shape == want.shape == (n,)
    if ties:  # exact integer arithmetic: equal everywhere, lowest index on ties
        assert (_min_count(x, e) > 1).sum() >= 3
        assert got.tolist() == want.tolist() and auto.tolist() == want.tolist()
        return
    # floats: summation order may flip a near-tie only
    decisive = _margin(x, e) > 1e-3 * _margin(x, e).median()
    assert decisive.float().mean() > 0.99
    assert auto[decisive].tolist() == want[decisive].tolist()
    if fast:
        # tf32 keeps the best two of its scores, then re-ranks them exactly: wrong only where the
        # third-best code is within tf32's error of the best (bound: 2^-8 |x| max|e|)
        bound = 2.0**-8 * x.double().norm(dim=1) * e.double().norm(dim=1).max()
        decisive = _gap_to_third(x, e) > bound
        assert decisive.float().mean() > 0.8
    assert got[decisive].tolist() == want[decisive].tolist()


def _gap_to_third(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Per row: the float64 gap between the best and the third-best score (inf when K < 3)."""
    scores = e.double().pow(2).sum(1) - 2 * x.double() @ e.double().T
    if scores.shape[1] < 3:
        return torch.full((scores.shape[0],), float("inf"), dtype=torch.float64)
    three = scores.topk(3, dim=1, largest=False).values
    return three[:, 2] - three[:, 0]


def break_ptxas(monkeypatch, folder) -> None:
    """Point triton at assemblers (ptxas, and the ptxas-blackwell that triton >= 3.7 runs for
    sm_90+) that report the real one's version, so triton takes them, and then fail every
    assembly: a broken CUDA toolchain, through triton's real compiler."""
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas", "ptxas-blackwell"):
        real = os.path.join(bin_dir, name)
        if not os.path.exists(real):
            continue
        fake = folder / name
        fake.write_text(
            f'#!/bin/sh\ncase "$*" in *--version*) exec "{real}" --version;; esac\n'
            'echo "ptxas fatal: broken on purpose by the vqgpt test" >&2\nexit 1\n'
        )
        fake.chmod(0o755)
        monkeypatch.setenv(f"TRITON_{name.upper().replace('-', '_')}_PATH", str(fake))


@needs_cuda
def test_a_kernel_that_really_fails_on_cuda_falls_back_with_one_warning(monkeypatch, tmp_path):
    """A real compile failure on real hardware, not a raised stand-in: triton's own compiler
    pipeline with a ptxas that fails, tiles no other test compiles and an empty kernel cache;
    "auto" then falls back to the chunked search with one warning."""
    import functools
    import warnings

    from vqgpt.tokenizer import kernels, quantize

    monkeypatch.delenv(quantize.SEARCH_BACKEND_ENV, raising=False)
    monkeypatch.setattr(quantize, "_triton_failure", "")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    break_ptxas(monkeypatch, tmp_path)
    x, e = _inputs(3000, 2000, 5, ties=True, seed=5)
    x, e = x.cuda(), e.cuda()
    fresh_tiles = functools.partial(kernels.nearest_code_triton, blocks=(32, 32, 16))
    try:
        fresh_tiles(x, e)
    except Exception as err:  # the precondition: it cannot compile now
        failure = err
    else:
        pytest.skip("this triton compiled past the failing ptxas: no way to break it here")
    monkeypatch.setattr(kernels, "nearest_code_triton", fresh_tiles)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = quantize.nearest_code(x, e, 512)
        second = quantize.nearest_code(x, e, 512)
    want = quantize.nearest_code(x.cpu(), e.cpu(), 512, backend="chunked")
    assert first.is_cuda and torch.equal(first.cpu(), want) and torch.equal(second.cpu(), want)
    runtime = [w for w in caught if w.category is RuntimeWarning]
    assert len(runtime) == 1, [str(w.message) for w in caught]
    assert type(failure).__name__ in str(runtime[0].message)


@needs_cuda
def test_the_quantizer_on_cuda_picks_the_codes_of_the_cpu():
    """The whole quantizer (the dispatch inside the model) on CUDA gives the CPU's codes."""
    from vqgpt.tokenizer.families import build_quantizer
    from vqgpt.tokenizer.quantize import QuantizerConfig

    torch.manual_seed(0)
    quantizer = build_quantizer(64, QuantizerConfig(codebook_size=1024)).eval()
    z = torch.randn(8, 64, 8, 8)
    codes_cpu = quantizer(z).codes
    codes_cuda = quantizer.cuda()(z.cuda()).codes.cpu()
    agree = (codes_cpu == codes_cuda).float().mean().item()
    assert agree > 0.999, agree


if __name__ == "__main__":
    print(json.dumps(_worker()))
