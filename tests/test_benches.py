"""The benchmarks that compare whole paths still run, and both paths make the same output."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fmbseg.models.registry import list_models

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_stage1_bench_runs_both_paths_to_the_same_masks():
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    out = subprocess.run(
        [sys.executable, "bench/stage1.py", "--images", "3", "--warmup", "1", "--threads", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    header = next(ln for ln in lines if ln.startswith("path "))
    peak = "peak MiB" in header  # a column more on CUDA
    rows = {}
    for line in lines:
        name = line.split(" ", 1)[0]
        if name in ("reference", "ours"):
            numbers = line.split()[-4 if peak else -3 :]
            rows[name] = (float(numbers[0]), int(numbers[2]))  # s/image, masks
    assert set(rows) == {"reference", "ours"}, out.stdout
    # fp32 on the CPU, the same rules: the batched path makes the very masks the loop makes
    assert rows["ours"][1] == rows["reference"][1] > 0, out.stdout
    ratio = re.search(r"throughput ours / reference: ([\d.]+)x", out.stdout)
    assert ratio and float(ratio.group(1)) > 0, out.stdout
    # where the time goes: clip, sam, rest per image, adding up to the path's s/image
    parts = {
        ln.split()[0]: [float(v) for v in ln.split()[1:]] for ln in lines if ln.startswith("  ")
    }
    assert set(parts) == {"reference", "ours"} and all(len(p) == 3 for p in parts.values())
    assert parts["ours"][1] > 0 and parts["reference"][1] > 0, out.stdout  # SAM time
    assert abs(sum(parts["ours"]) - rows["ours"][0]) <= 0.002, out.stdout  # the same clock
    assert 0.8 * rows["reference"][0] <= sum(parts["reference"]) <= rows["reference"][0] + 0.002


@pytest.mark.slow
def test_sam2_vs_sam_bench_reports_both_teachers():
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    out = subprocess.run(
        [
            sys.executable,
            "bench/sam2_vs_sam.py",
            "--images",
            "2",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--keep-all",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {
        ln.split()[0]: ln.split()[1:]
        for ln in out.stdout.splitlines()
        if ln.startswith(("sam_tiny ", "sam2.1_tiny "))
    }
    assert set(rows) == {"sam_tiny", "sam2.1_tiny"}, out.stdout
    for seconds, per_second, prompt, auto, peak in rows.values():
        assert float(seconds) > 0 and abs(float(seconds) * float(per_second) - 1) < 0.02
        assert float(prompt) > 0 and float(auto) > 0 and float(peak) > 0, out.stdout
    assert re.search(r"throughput sam2.1_tiny / sam_tiny: [\d.]+x", out.stdout), out.stdout


def test_io_paths_bench_checks_each_pair_of_paths_agree():
    out = subprocess.run(
        [
            sys.executable,
            "bench/io_paths.py",
            "--masks",
            "8",
            "--size",
            "48x64",
            "--repeat",
            "2",
            "--pieces",
            "6",
            "--piece-rows",
            "3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]  # its asserts: the paths give equal outputs
    for section in (
        "shard read",
        "RLE encoding",
        "streamed Parquet: 6 pieces of 3 records",
        "overlays of 48x64",
        "label PNGs",
    ):
        assert section in out.stdout, out.stdout
    ratios = re.findall(
        r"^a row group per piece\s+\d+\s+([\d.]+)x\s+\d+\s+([\d.]+)x$", out.stdout, re.M
    )
    assert len(ratios) == 1 and all(float(r) > 0 for r in ratios[0]), out.stdout


def test_sam_post_bench_builds_the_same_rows_both_ways():
    out = subprocess.run(
        [
            sys.executable,
            "bench/sam_post.py",
            "--stand-in",
            "20",
            "--masks",
            "12",
            "--images",
            "3",
            "--size",
            "96x128",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "3 images 96x128, 5 classes" in out.stdout and "51 rows" in out.stdout, out.stdout
    found = re.search(r"throughput ours / reference: ([\d.]+)x; same rows: (\w+)", out.stdout)
    assert found and float(found.group(1)) > 0 and found.group(2) == "True", out.stdout


def test_gpu_script_passes_only_options_its_benches_accept():
    env = {**os.environ, "DRY_RUN": "1", "PY": sys.executable, "LOG": os.devnull}
    run = functools.partial(
        subprocess.run,
        ["bash", "bench/gpu.sh"],
        cwd=ROOT,
        text=True,
        capture_output=True,
        timeout=60,
        check=True,
    )
    steps = [line.split() for line in run(env=env).stdout.splitlines()]
    assert len(steps) == 9 and steps[0][:2] == ["bench/stage1.py", "--config"], steps
    assert "--keep-all" in steps[0]  # the headline figure first
    for script, *args in steps:
        out = subprocess.run(
            [sys.executable, script, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        for flag in (a for a in args if a.startswith("--")):
            assert re.search(rf"(^|[\s\[]){re.escape(flag)}\b", out), (script, flag, out)
        names = [a for a in args if a.startswith(("sam_", "sam2", "clip_"))]
        assert set(names) <= set(list_models()), names  # full-size models it builds
    # past the deadline no step starts: the run ends within the time it was given
    late = run(env={**env, "DEADLINE_S": "10"}).stdout.splitlines()
    assert len(late) == 9 and all(line.startswith("### skipped") for line in late), late


@pytest.mark.slow
def test_annotate_bench_reports_every_stage_and_the_no_model_floor():
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    out = subprocess.run(
        [sys.executable, "bench/annotate.py", "--images", "4", "--repeat", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    first_table = out.stdout.split("images/s and the outside share")[0]  # not the phase table
    rows = {ln.split()[0]: ln.split() for ln in first_table.splitlines() if ln.strip()}
    for stage in ("index", "clip_dense", "sam", "merge", "export", "total"):
        assert stage in rows, out.stdout
    assert float(rows["sam"][3]) > 0 and float(rows["merge"][3]) == 0  # model s
    floor = re.search(
        r"stages without model calls \(index, merge, export\) alone: (\d+)%", out.stdout
    )
    total_share = int(rows["total"][4].rstrip("%"))
    assert floor and 0 < int(floor.group(1)) <= total_share, out.stdout


@pytest.mark.slow
def test_driver_memory_bench_measures_each_count_in_its_own_driver():
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    out = subprocess.run(
        [
            sys.executable,
            "bench/driver_memory.py",
            "--images",
            "4",
            "8",
            "--shard-size",
            "4",
            "--row-group-mib",
            "0.001",
            "--arrow-pool",
            "system",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Arrow memory pool system" in out.stdout, out.stdout
    rows = [ln.split() for ln in out.stdout.splitlines() if ln.split()[:1] in (["4"], ["8"])]
    assert [r[0] for r in rows] == ["4", "8"] and all(len(r) == 11 for r in rows), out.stdout
    assert all(int(r[1]) > 0 and float(r[-2]) > 0 for r in rows), out.stdout  # masks, KiB
    assert int(rows[1][-1]) > 1, out.stdout  # row groups of 1 KiB: one per merge shard
    growth = re.search(r"growth per extra image: heap peak (-?\d+) bytes", out.stdout)
    assert growth, out.stdout


def test_decode_memory_bench_prints_each_path_and_the_check_needs_less():
    out = subprocess.run(
        [sys.executable, "bench/decode_memory.py", "--side", "3000"],  # clip_dense: halved
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    peaks = {}
    for line in out.stdout.splitlines():
        m = re.match(r"^(PNG|JPEG)\s+(.+?)\s+(-?\d+)\s+\(", line)
        if m:
            peaks[(m.group(1), m.group(2))] = int(m.group(3))
    assert len(peaks) == 10, out.stdout
    for fmt in ("PNG", "JPEG"):
        assert peaks[(fmt, "index check, now")] < peaks[(fmt, "index check, before")], out.stdout
        now, before = (
            peaks[(fmt, "clip_dense input, now")],
            peaks[(fmt, "clip_dense input, before")],
        )
        assert now < before / 2, out.stdout
    assert "(1500, 1500, 3)" in out.stdout  # clip_dense's decode, at half size
