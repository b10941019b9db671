"""The command line end to end: outputs, the load API, resume, signals, bad input."""
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import vaegan
from vaegan.cli import train_command
from vaegan.schedule import learning_rate
from vaegan.options import resolve_precision
from conftest import ROOT, SMALL, TRAIN, run_train
from datagen import make_folder

SHORT = ["--steps", "4", "--log-every", "2", "--sample-every", "2", "--checkpoint-every", "2"]


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_run_writes_config_metrics_grids_tensorboard_and_a_loadable_model(tmp_path):
    out = tmp_path / "run"
    done = run_train(SMALL + SHORT + ["--lr-schedule", "authors", "--out", str(out)])
    assert done.returncode == 0, done.stderr
    precision, why = resolve_precision(torch.device("cpu"))  # bf16 on a CPU with bf16 instructions
    assert f"device cpu, precision {precision} ({why}), loader pil" in done.stderr
    written = json.loads((out / "config.json").read_text())
    config, machine = written["run"], written["machine"]
    assert "auto" not in {**config, **machine}.values()
    assert None not in (config[n] for n in ("kernels", "out")) and None not in machine.values()
    assert config["kernels"] == "torch" and machine["memory_format"] == "channels-last" and machine["loader"] == "pil"
    assert machine["workers"] == 0 and written["reasons"]["workers"] == "requested"
    assert config["steps"] == 4 and config["gamma"] == 1e-3 and config["data"] == "builtin:faces"
    assert set(config) >= {"model", "lr", "batch_size", "seed", "precision", "latent_size", "margin"}
    lines = metrics(out)
    assert [m["step"] for m in lines] == [2, 4]
    for key in ("kl", "llike", "dis_loss", "gen_loss", "real_cost", "fake_cost", "update_decoder",
                "update_discriminator", "skipped_decoder", "skipped_discriminator", "img_per_s"):
        assert key in lines[-1], key
    assert lines[-1]["img_per_s"] > 0
    # the authors' annealing over the run's 4 steps: the rate of steps 2 and 4, as logged and as the optimizers hold it
    assert config["lr_schedule"] == "authors" and config["lr"] == pytest.approx(0.025 / 64)
    assert config["lr_schedule_steps"] == 4
    assert [m["lr"] for m in lines] == [learning_rate("authors", config["lr"], s - 1, 4) for s in (2, 4)]
    assert lines[0]["lr"] < config["lr"] and lines[1]["lr"] < lines[0]["lr"]
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    # the checkpoint keeps the run's facts, its own decisions included: a resume decides the machine's again
    kept = saved["config"]
    assert kept == config and kept["precision"] == precision and kept["kernels"] == "torch"
    assert not set(kept) & set(machine)
    for state in saved["optimizers"].values():
        assert float(state["param_groups"][0]["lr"]) == pytest.approx(learning_rate("authors", config["lr"], 4, 4))
    for name in ("samples-0000002.png", "reconstructions-0000004.png", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tensorboard"))
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]

    model = vaegan.load(str(out))
    assert not model.training
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (3, 16)
    assert model.decode(mu).shape == x.shape and model.reconstruct(x).shape == x.shape
    assert torch.equal(model.sample(5, seed=1), model.sample(5, seed=1))
    assert not torch.equal(model.sample(5, seed=1), model.sample(5, seed=2))
    with model.batch_statistics():
        assert model.decode(mu).shape == x.shape
    assert not model.training


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    data = tmp_path / "data"
    make_folder(data, n=20)
    common = SMALL + ["--data", str(data), "--workers", "2", "--log-every", "1", "--sample-every", "100",
                      "--checkpoint-every", "100"]
    whole, half = tmp_path / "whole", tmp_path / "half"
    assert run_train(common + ["--steps", "6", "--out", str(whole)]).returncode == 0
    # the half run stops at 3 of the 6 steps its (annealed) learning rate spans
    assert run_train(common + ["--steps", "3", "--lr-schedule-steps", "6", "--out", str(half)]).returncode == 0
    done = run_train(["--resume", str(half), "--steps", "6"])
    assert done.returncode == 0, done.stderr
    assert "resuming at step 3 of 6" in done.stderr
    a = torch.load(whole / "checkpoint.pt", weights_only=False)
    b = torch.load(half / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    for net in a["optimizers"]:
        for key, state in a["optimizers"][net]["state"].items():
            assert torch.equal(state["square_avg"], b["optimizers"][net]["state"][key]["square_avg"])
    assert a["skips"] == b["skips"]
    assert metrics(whole) == [{**m, "img_per_s": w["img_per_s"]} for m, w in zip(metrics(half), metrics(whole))]


@pytest.mark.slow
def test_resume_refuses_to_change_the_model_and_a_used_out_needs_resume(tmp_path):
    out = tmp_path / "run"
    assert run_train(SMALL + ["--steps", "1", "--out", str(out)]).returncode == 0
    done = run_train(["--resume", str(out), "--lr", "0.1"])
    assert done.returncode == 2 and "--lr cannot change when resuming" in done.stderr
    done = run_train(["--resume", str(out), "--lr-schedule-steps", "9"])
    assert done.returncode == 2 and "--lr-schedule-steps cannot change when resuming" in done.stderr
    done = run_train(SMALL + ["--steps", "1", "--out", str(out)])
    assert done.returncode == 2 and f"--resume {out}" in done.stderr
    done = run_train(["--resume", str(tmp_path / "nothing")])
    assert done.returncode == 2 and "no checkpoint there" in done.stderr


def start(args):
    return subprocess.Popen([sys.executable, TRAIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)


def wait_for_step(run, process, step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = os.path.join(run, "metrics.jsonl")
        if os.path.exists(path) and any(json.loads(line)["step"] >= step for line in open(path) if line.strip()):
            return
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    process = start(SMALL + ["--steps", "1000", "--log-every", "1", "--checkpoint-every", "1000", "--out", str(out)])
    wait_for_step(out, process, 2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "stop requested" in stderr
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["step"] >= 2 and state["step"] == metrics(out)[-1]["step"]
    done = run_train(["--resume", str(out), "--steps", str(state["step"] + 1)])
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = SMALL + ["--steps", "1000", "--log-every", "1", "--checkpoint-every", "1", "--out", str(out)]
    process = start(args)
    wait_for_step(out, process, 1)
    for delay in (0.0, 0.13, 0.29, 0.41, 0.07):  # kill at moments unrelated to the step
        time.sleep(delay)
        process.kill()
        process.wait()
        state = torch.load(out / "checkpoint.pt", weights_only=False)  # never torn
        vaegan.load(str(out))
        process = start(["--resume", str(out), "--steps", "1000"])
        wait_for_step(out, process, state["step"] + 1)
    process.kill()
    process.wait()
    assert vaegan.load(str(out)) is not None


@pytest.mark.slow
def test_corrupt_image_among_many_is_skipped_counted_and_reported(tmp_path):
    data = tmp_path / "data"
    paths = make_folder(data, n=8, nested=False)
    with open(paths[0], "wb") as f:
        f.write(b"garbage, not an image")
    out = tmp_path / "run"
    done = run_train(SMALL + ["--data", str(data), "--steps", "2", "--log-every", "1", "--out", str(out)])
    assert done.returncode == 0, done.stderr
    assert f"skipped unreadable image {paths[0]}" in done.stderr
    assert "1 unreadable image(s) were skipped" in done.stderr
    assert metrics(out)[-1]["unreadable_images"] == 1


@pytest.mark.parametrize("args,message", [
    (["--lr", "-1"], "--lr takes a finite number > 0.0, not -1"),
    (["--image-size", "48"], "argument --image-size: invalid choice: 48"),
    (["--model", "vqgan"], "invalid choice: 'vqgan'"),
    (["--steps", "0"], "--steps takes a positive integer, not 0"),
    (["--batch-size", "many"], "--batch-size takes a positive integer, not 'many'"),
    (["--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
    (["--device", "tpu"], "--device takes auto, cpu, cuda or cuda:N, not 'tpu'"),
    (["--device", "cuda"], "CUDA is not available on this machine"),
    (["--model", "vae", "--dis-sees-recon"], "--dis-sees-recon applies to --model vaegan or cvaegan only"),
    (["--data", "/no/such/place"], "/no/such/place: no such directory"),
])
def test_bad_values_are_rejected_with_a_message_and_no_traceback(tmp_path, capsys, args, message):
    if args == ["--device", "cuda"] and torch.cuda.is_available():
        args = ["--device", "cuda:999"]  # still a device this machine lacks
        message = "cuda"
    args = ["--device", "cpu", *args, "--out", str(tmp_path / "run"), "--steps", "1"]
    try:  # in this process (an error that escaped would fail the test); the script itself once, below
        status = train_command(args, prog="train.py")
    except SystemExit as e:  # argparse's
        status = e.code
    assert status == 2 and message in capsys.readouterr().err
    if "/no/such/place" in args:
        done = run_train(args)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_vaegan_command_and_train_py_take_the_same_options(capsys, monkeypatch):
    vaegan_bin = shutil.which("vaegan", path=os.path.dirname(sys.executable)) or shutil.which("vaegan")
    assert vaegan_bin, "the vaegan console command is not installed (pip install -e .)"
    via_command = subprocess.run([vaegan_bin, "train", "--help"], capture_output=True, text=True)
    assert via_command.returncode == 0
    monkeypatch.setattr(sys, "argv", [TRAIN, "--help"])
    with pytest.raises(SystemExit) as exited:  # train.py in this process
        runpy.run_path(TRAIN, run_name="__main__")
    assert exited.value.code == 0
    via_script = capsys.readouterr().out

    def options(text):
        return sorted({w.strip("[],") for w in text.split() if w.startswith(("--", "[--"))})
    assert options(via_command.stdout) == options(via_script)
    assert {"--data", "--model", "--image-size", "--channels", "--batch-size", "--steps", "--lr", "--gamma",
            "--seed", "--device", "--precision", "--out", "--resume", "--log-every",
            "--sample-every"} <= set(options(via_script))


@pytest.mark.slow
def test_bf16_training_runs_on_cpu(tmp_path):
    out = tmp_path / "run"
    done = run_train(SMALL + ["--steps", "2", "--log-every", "1", "--precision", "bf16", "--out", str(out)])
    assert done.returncode == 0, done.stderr
    assert "precision bf16" in done.stderr
    assert all(m["llike"] == m["llike"] for m in metrics(out))  # finite, not NaN


@pytest.mark.slow
def test_short_training_on_real_faces_lowers_feature_and_pixel_errors(tmp_path):
    out = tmp_path / "run"
    done = run_train(["--latent-size", "32", "--fc-width", "128", "--batch-size", "16", "--workers", "0",
                      "--steps", "60", "--log-every", "1", "--sample-every", "1000", "--out", str(out)])
    assert done.returncode == 0, done.stderr
    lines = metrics(out)

    def mean(values):
        return sum(values) / len(values)
    pixel = [m["pixel_error"] for m in lines]
    llike = [m["llike"] for m in lines]
    assert mean(pixel[-10:]) < 0.75 * mean(pixel[:3])
    # The discriminator's features grow from their small initial scale in the first steps, so the
    # feature error first rises with them; after that it must fall well below its early level.
    assert mean(llike[-10:]) < 0.5 * max(llike[:15])


@pytest.mark.slow
def test_triton_kernels_train_like_the_reference_losses(tmp_path):
    # Both kernel sets draw the same Philox noise, so the runs differ only by float rounding.
    runs = {}
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels compiled there, interpreted here
    for kernel_set in ("torch", "triton"):
        out = tmp_path / kernel_set
        done = run_train(SMALL + ["--steps", "3", "--log-every", "1", "--kernels", kernel_set, "--device", device,
                                  "--precision", "fp32", "--out", str(out)])  # the kernels' rounding, not bf16's
        assert done.returncode == 0, done.stderr
        assert f"kernels {kernel_set} (" in done.stderr
        runs[kernel_set] = metrics(out)
    for torch_line, triton_line in zip(runs["torch"], runs["triton"]):
        for key in ("kl", "llike", "dis_loss", "real_cost", "fake_cost", "pixel_error"):
            assert triton_line[key] == pytest.approx(torch_line[key], rel=1e-3, abs=1e-4), (torch_line["step"], key)


def test_triton_kernels_on_a_cpu_without_the_interpreter_are_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = run_train(SMALL + ["--steps", "1", "--kernels", "triton", "--out", str(tmp_path / "run")], env=env)
    assert done.returncode == 2
    assert "--kernels triton: Triton kernels need a CUDA device" in done.stderr and "TRITON_INTERPRET=1" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_authors_learning_rate_schedule():
    from vaegan.config import TrainConfig
    assert TrainConfig(data="celeba").resolved().lr_schedule == "authors"
    assert TrainConfig().resolved().lr_schedule == "constant"  # the built-in faces' demonstration preset
    assert TrainConfig(data="celeba").resolved().up_conv == "transposed"  # the authors' decoder
    assert TrainConfig().resolved().up_conv == "resize"
    # gamma: the authors' per image size (celeba_aegan.py, cifar_aegan.py); the demo's own; any given value wins
    assert TrainConfig(data="celeba").resolved().gamma == 1e-6
    assert TrainConfig(data="celeba", image_size=32).resolved().gamma == 1e-5
    assert TrainConfig().resolved().gamma == 1e-3
    assert TrainConfig(data="celeba", image_size=32, gamma=1e-6).resolved().gamma == 1e-6
    lr = 0.025 / 64
    rates = [learning_rate("authors", lr, step, 62_500) for step in range(62_500)]
    assert rates[0] == lr == pytest.approx(3.906e-4, rel=1e-3)
    assert rates[31_250] == pytest.approx((0.025 - 0.5 ** 0.75 * (0.025 - 1e-5)) / 64) == pytest.approx(1.586e-4, rel=1e-3)
    assert rates[-1] == pytest.approx((0.025 - (249 / 250) ** 0.75 * (0.025 - 1e-5)) / 64)
    assert 1.2e-6 < rates[-1] < 1.4e-6
    assert len(set(rates[250 * 7:250 * 8])) == 1 and rates[250 * 8] < rates[250 * 8 - 1]  # once per 250 steps
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert learning_rate("constant", 1e-3, 500, 1000) == 1e-3
    short = [learning_rate("authors", lr, step, 10) for step in range(10)]  # the same shape over any length
    assert short[0] == lr and short[5] == pytest.approx(rates[31_250]) and short[9] == pytest.approx(
        learning_rate("authors", lr, 56_250, 62_500))


def test_weight_decay_is_deeppys_on_a_batch_sum_and_spares_the_mu_logvar_heads():
    from vaegan.config import TrainConfig
    from vaegan.models import VAEGAN
    from vaegan.optimizers import build_optimizers
    model = VAEGAN("vaegan", 32, 1, latent_size=8, fc_width=16)
    optimizers = build_optimizers(model, TrainConfig(weight_decay=1e-5, batch_size=16), global_batch=64)
    heads = {id(model.encoder.mu.weight), id(model.encoder.logvar.weight)}
    for name, opt in optimizers.items():
        decay, no_decay = opt.param_groups
        assert decay["weight_decay"] == pytest.approx(2 * 1e-5 / 64)  # 2 lambda w on the sum = 2 lambda / B on the mean
        assert no_decay["weight_decay"] == 0
        assert all(p.dim() > 1 and id(p) not in heads for p in decay["params"])
        network = getattr(model, name)
        convs_and_linears = [m.weight for m in network.modules()
                             if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear))]
        assert {id(p) for p in decay["params"]} == {id(p) for p in convs_and_linears} - heads
    assert heads <= {id(p) for p in optimizers["encoder"].param_groups[1]["params"]}


def test_a_run_from_before_up_conv_resumes_and_loads_with_the_transposed_convolutions_it_trained(tmp_path):
    from vaegan.checkpoint import save
    from vaegan.config import TrainConfig, run_facts
    from vaegan.models import VAEGAN
    from vaegan.trainer import merge_resumed_config

    saved = run_facts(TrainConfig().resolved())  # the built-in faces, whose preset now resizes
    assert saved.pop("up_conv") == "resize"
    saved["up_conv_fan"] = "in"  # the option it had then
    assert merge_resumed_config(TrainConfig(resume=str(tmp_path)), saved).up_conv == "transposed"
    old = VAEGAN("vaegan", 32, 1)
    save(str(tmp_path / "checkpoint.pt"), {"config": saved, "model": old.state_dict(), "step": 150})
    loaded = vaegan.load(str(tmp_path))
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in loaded.decoder.modules())
    z = torch.randn(2, 128)
    assert torch.equal(loaded.decode(z), old.eval().decoder(z))
