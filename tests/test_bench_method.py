"""The step benchmark's method on a CPU: the step clock (bench/timing.py), the profile's kernel
groups and a smoke run of bench/profile_step.py at tiny sizes."""
import json
import os
import re
import sys
import time

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
# bench/ only while importing: its test_*.py share names with tests/'s, which pytest imports by name
sys.path.insert(0, BENCH)
try:
    import profile_step
    import timing
finally:
    sys.path.remove(BENCH)


def test_step_clock_times_the_steps_as_one_stretch():
    calls = []

    def fn():
        calls.append(time.perf_counter())
        time.sleep(0.01)
    clock = timing.StepClock(fn, 5)
    with pytest.raises(RuntimeError):
        clock.seconds_per_step  # noqa: B018 (not timed yet)
    for _ in range(7):  # pytest-benchmark's pedantic calls its target once more, for the result
        clock()
    assert len(calls) == 5
    assert 0.01 <= clock.seconds_per_step < 0.05
    assert clock.seconds >= calls[-1] - calls[0] + 0.01


def test_event_seconds_warms_up_then_times():
    calls = []
    seconds = timing.event_seconds(lambda: calls.append(1), steps=4, warmup=3)
    assert len(calls) == 7 and 0 <= seconds < 0.01


def test_reachable_flops_is_a_rate():
    peak = timing.reachable_flops(n=64, dtype=torch.float32, steps=2)
    assert peak["flops_per_s"] > 0 and peak["n"] == 64 and peak["dtype"] == "float32"


@pytest.mark.parametrize("name,launcher,group", [
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", None, "convolution"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "aten::cudnn_convolution", "convolution"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "aten::mm", "matmul / GEMM"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", None, "matmul / GEMM"),
    ("triton_red_fused__native_batch_norm_legit_functional_convolution_backward_3", None,
     "elementwise / fused Triton"),
    ("triton_for_fused_7", None, "optimizer"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...>", None, "optimizer"),
    ("_gan_loss_forward", None, "fused losses (kernels/)"),
    ("void cudnn::bn_fw_tr_1C11_kernel_NCHW<__nv_bfloat16, float, 512, true, 1>", None, "normalisation"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::AUnaryFunctor<...>>", None,
     "elementwise / fused Triton"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::direct_copy_kernel_cuda<...>>", None,
     "copies / other"),
    ("Memcpy DtoD (Device -> Device)", None, "copies / other"),
    ("aten::convolution_backward", None, "convolution"),
    ("aten::mm", None, "matmul / GEMM"),
    ("aten::native_batch_norm_backward", None, "normalisation"),
    ("some_unknown_kernel", None, "copies / other"),
])
def test_kernel_groups(name, launcher, group):
    assert profile_step.kernel_group(name, launcher) == group


def test_a_kernel_without_its_op_takes_the_group_its_eager_launch_gave():
    # inside CUDA graphs a cuDNN convolution named like a GEMM has no launching op: the eager variant's op names it
    gemm_named_conv = "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64"

    def row(name, launcher):
        return profile_step.kernel_row(name, launcher, calls_per_step=1.0, us_per_step=10.0)
    variants = {"fair+torch": {"seconds_per_step": 1e-3, "profile_rows": [row(gemm_named_conv, "aten::cudnn_convolution")]},
                "fastest+torch": {"seconds_per_step": 1e-3, "profile_rows": [
                    row(gemm_named_conv, None), row(gemm_named_conv, "Torch-Compiled Region: 0/0"),
                    row("nvjet_tst_128x256", None)]}}
    assert [r["group"] for r in variants["fastest+torch"]["profile_rows"]] == ["matmul / GEMM"] * 3  # by name alone
    profile_step.regroup(variants, top=5)
    compiled = variants["fastest+torch"]
    assert [r["group"] for r in compiled["profile_rows"]] == ["convolution", "convolution", "matmul / GEMM"]
    assert compiled["profile_rows"][2]["grouped_by"] == "name"
    assert compiled["profile"]["groups"]["convolution"]["share"] == pytest.approx(2 / 3)


@pytest.mark.slow
def test_profile_step_runs_at_tiny_sizes(tmp_path):
    """The script's main, as bench/run_gpu.sh's profile stage runs it, at tiny sizes: the compiled
    fastest step and the fair eager step with the reference losses (one thread: on a shared
    2-core machine, 2 threads spin against each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reports = profile_step.main(["--batches", "2", "--width", "0.25", "--modes", "fastest,fair",
                                     "--kernels", "torch", "--steps", "1", "--warmup", "2", "--profile-steps", "1",
                                     "--out", str(tmp_path), "--prefix", "smoke"])
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "smoke-b2.json").read_text())
    assert set(report["variants"]) == set(reports[2]["variants"]) == {"fastest+torch", "fair+torch"}
    for name, variant in report["variants"].items():
        assert variant["img_per_s"] > 0 and variant["parameters_finite"] and not variant["fell_back"], name
        groups = variant["profile"]["groups"]
        assert set(groups) == set(profile_step.GROUPS)
        assert sum(g["share"] for g in groups.values()) == pytest.approx(1.0)
        assert groups["convolution"]["us_per_step"] > 0
        assert variant["profile"]["top"] and variant["profile"]["top"][0]["us_per_step"] > 0
    assert report["variants"]["fastest+torch"]["compile"] and report["variants"]["fastest+torch"]["unique_graphs"] > 0
    text = (tmp_path / "smoke-b2.md").read_text()
    assert "by group" in text and "fastest+torch" in text and "fair+torch" in text
    assert report["planned"] == ["fastest+torch", "fair+torch"] and "Incomplete" not in text
    assert not list(tmp_path.glob("*.part"))
    stopped = dict(report, planned=[*report["planned"], "fair+triton"])  # as a run stopped before its last variant
    assert "Incomplete: not measured (the run stopped first): fair+triton." in profile_step.markdown(stopped)


@pytest.mark.slow
def test_the_quick_gpu_call_plans_its_parts_within_one_call_and_each_writes_its_files_first(tmp_path):
    """`DRY_RUN=1 bash bench/run_gpu.sh quick` on a CPU: the printed plan (in the issue's order, every part's
    budget, the total within one 600 s device call), each part's text file, and the benchmarks' rows files there
    before any row is measured (a part stopped by its limit keeps what it has)."""
    import subprocess
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path))
    done = subprocess.run(["bash", "bench/run_gpu.sh", "quick"], capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(BENCH), env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    planned = re.findall(r"^  (\w+): (\d+) s \(by (\d+) s\)$", done.stdout, re.M)
    names = [name for name, _, _ in planned]
    dali = "DALI installed" in done.stdout
    assert names == ["preflight", "syncdebug", "loop64", "loop512", "step64"] + (["dali"] if dali else [])
    total = int(re.search(r"^quick: (\d+) s of (\d+) s$", done.stdout, re.M).group(1))
    assert total == int(planned[-1][2]) <= 580 and total >= sum(int(seconds) for _, seconds, _ in planned)
    stages = ["preflight", "syncdebug", "quick-loop64", "quick-loop512", "quick-step64"] + (["quick-dali"] if dali else [])
    assert re.findall(r"^== ([\w-]+) -> ", done.stdout, re.M) == stages
    for stage in stages:
        text = next(tmp_path.glob(f"gpu-*-{stage}.txt")).read_text()
        assert f"stage: {stage}" in text and "dry run: would run for at most" in text
        command = re.search(r"^command: (.*) \(", text, re.M).group(1)  # runnable as printed
        assert command == (f"QUICK_PLAN={stage[6:]}:{planned[names.index(stage[6:])][1]} bash bench/run_gpu.sh quick"
                           if stage.startswith("quick-") else f"bash bench/run_gpu.sh {stage}")
        rows = list(tmp_path.glob(f"gpu-*-{stage}-rows.jsonl"))
        if stage.startswith("quick-"):  # a benchmark: its rows file exists, empty, before anything is measured
            assert len(rows) == 1 and rows[0].read_text() == ""
    assert "bench/test_loop.py -s -k default" in next(tmp_path.glob("gpu-*-quick-loop512.txt")).read_text()
    # a plan that does not fit one call is refused before anything runs
    tight = subprocess.run(["bash", "bench/run_gpu.sh", "quick"], capture_output=True, text=True, timeout=600,
                           cwd=os.path.dirname(BENCH), env=dict(env, OUT=str(tmp_path / "tight"), QUICK_SECONDS="300"))
    assert tight.returncode == 2 and "the plan does not fit 300 s" in tight.stdout and "==" not in tight.stdout
