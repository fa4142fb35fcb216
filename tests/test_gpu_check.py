"""benchmarks/gpu_check.py: skipped without CUDA, every stage's code path in --tiny CPU mode, and the
time budget skipping stages rather than overrunning."""

from __future__ import annotations

import re

import pytest

from conftest import run_cli

SCRIPT = "benchmarks/gpu_check.py"
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}
SUMMARY_LINE = re.compile(r"^([a-z0-9_]+)=(-?\d+(?:\.\d+)?) (img/s|%|s|x)$")
THROUGHPUT = [f"{source}_{variant}" for source in ("synthetic", "folder") for variant in ("fp32", "bf16", "bf16_cl")]
COMPILED = ["synthetic_bf16_cl_compile", "folder_bf16_cl_compile"]
OTHERS = {
    "quickstart_test_acc": "%", "quickstart_wall": "s", "ddp_test_acc": "%", "ddp_wall": "s",
    "frozen_cache_speedup": "x", "frozen_cache_acc_cached": "%", "frozen_cache_acc_uncached": "%",
}


def summary(stdout: str) -> dict[str, tuple[float, str]]:
    """The figures after the summary header; every line there must parse."""
    lines = stdout.split("== summary ==\n", 1)[1].strip().splitlines()
    figures = {}
    for line in lines:
        match = SUMMARY_LINE.match(line)
        assert match, f"summary line does not parse as name=value unit: {line!r}"
        figures[match[1]] = (float(match[2]), match[3])
    return figures


def test_without_cuda_it_says_skipped_and_exits_0():
    result = run_cli(SCRIPT, env=NO_GPU, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "skipped: no CUDA device visible" in result.stdout
    assert "== summary ==" not in result.stdout


@pytest.mark.slow
def test_an_exhausted_budget_skips_every_stage_with_a_line():
    result = run_cli(SCRIPT, "--device", "cpu", "--tiny", "--budget", "0", env=NO_GPU, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    skipped = re.findall(r"^skipped: (\w+) \((.+)\)$", result.stdout, re.MULTILINE)
    assert sorted(name for name, _ in skipped) == sorted([*THROUGHPUT, *COMPILED, "ema", "quickstart", "ddp", "frozen_cache"])
    assert all("time budget" in why or "torch.compile" in why for _, why in skipped)
    assert summary(result.stdout) == {}


@pytest.mark.slow
def test_tiny_cpu_run_measures_every_stage_through_the_real_code():
    """Every stage runs (ResNet-18, 32 px, 2 steps; quickstart, DDP on CPU and the frozen-cache
    benchmark as subprocesses) and prints a parsable figure; compile is skipped with its reason."""
    result = run_cli(SCRIPT, "--device", "cpu", "--tiny", "--budget", "1500", "--run-cap", "600", "--stage-cap", "600",
                     env=NO_GPU, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = summary(result.stdout)
    expected = {**dict.fromkeys(THROUGHPUT, "img/s"), **OTHERS}
    assert {name: unit for name, (_, unit) in figures.items()} == expected
    assert all(figures[name][0] > 0 for name in [*THROUGHPUT, "quickstart_wall", "ddp_wall", "frozen_cache_speedup"])
    assert all(0 <= value <= 100 for value, unit in figures.values() if unit == "%")
    for name in COMPILED:
        assert re.search(rf"^skipped: {name} \(torch.compile on CPU in --tiny mode", result.stdout, re.MULTILINE)
