"""The trainer's reconstruction check (vaegan/collapse.py): what it measures, when it reports a collapse, and
what it names as the last good checkpoint."""
import json
import os

import pytest
import torch

from vaegan import collapse, trainer
from vaegan.config import TrainConfig
from vaegan.models import VAEGAN

TINY = dict(image_size=32, latent_size=16, fc_width=64, batch_size=8, workers=0, device="cpu", width=0.25)


class Images:
    """A dataset as the loaders see one: (image, attributes, unreadable) per (index, flip)."""

    def __init__(self, n, attributes=0, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 1, 32, 32, generator=generator) * 2 - 1
        self.attributes = torch.randint(0, 2, (n, attributes), generator=generator).float() * 2 - 1

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        index, flip = item[:2]
        return (self.images[index].flip(-1) if flip else self.images[index]), self.attributes[index], ()


def test_check_batch_spreads_over_the_data_and_is_unflipped():
    data = Images(1000)
    images, attributes = collapse.check_batch(data)
    assert images.shape == (64, 1, 32, 32) and attributes.shape == (64, 0)
    assert torch.equal(images[1], data.images[15]) and torch.equal(images[-1], data.images[984])
    assert collapse.check_batch(Images(10))[0].shape[0] == 10


def test_relative_error_is_the_eval_mode_reconstructions_over_the_mean_images_and_keeps_the_mode():
    torch.manual_seed(0)
    model = VAEGAN("vaegan", 32, 1, 16, 64, width=0.25)
    images = Images(16, seed=1).images
    model.train()
    error = collapse.relative_reconstruction_error(model, images)
    assert model.training
    model.eval()
    with torch.no_grad():
        expected = ((model.reconstruct(images) - images) ** 2).mean() / ((images - images.mean(0)) ** 2).mean()
    assert error == pytest.approx(expected.item(), rel=1e-6)
    # an input-blind decoder drawing the batch's mean image scores 1
    model.decoder.forward = lambda z, y=None: images.mean(0, keepdim=True).expand(len(z), -1, -1, -1)
    assert collapse.relative_reconstruction_error(model, images) == pytest.approx(1.0, rel=1e-5)


def test_conditional_models_are_checked_with_their_attributes():
    torch.manual_seed(0)
    model = VAEGAN("cvaegan", 32, 1, 16, 64, attribute_names=("a", "b", "c"), width=0.25)
    watch = collapse.CollapseWatch(model, Images(40, attributes=5), every=10, attribute_columns=[0, 3, 4])
    assert watch.attributes.shape == (40, 3)
    assert watch.check(10, report=lambda line: None) > 0


def watch_with_errors(monkeypatch, errors):
    values = iter(errors)
    monkeypatch.setattr(collapse, "relative_reconstruction_error", lambda *args: next(values))
    return collapse.CollapseWatch(VAEGAN("vae", 32, 1, 16, 64, width=0.25), Images(8), every=100)


def test_a_collapse_is_reported_once_with_its_step_and_the_last_good_kept_checkpoint(monkeypatch):
    lines = []
    watch = watch_with_errors(monkeypatch, [0.9, 0.5, 0.8, 0.6, 1.4, 1.6, 0.7, 1.2])
    for step in (100, 200, 300):
        watch.check(step, lines.append)
    watch.saved(300, ["run/checkpoint.pt", "run/checkpoint-0000300.pt"])
    watch.check(400, lines.append)
    watch.saved(400, ["run/checkpoint.pt"])
    assert lines == []  # noise: 0.8 and 0.6 are under the mean image's 1 and twice the best, 0.5
    assert watch.check(500, lines.append) == 1.4
    watch.saved(500, ["run/checkpoint.pt"])  # a save while collapsed is not a good one
    watch.check(600, lines.append)  # still collapsed: said once
    assert lines == ["vaegan: step 500: the reconstructions collapsed: error 1.40 on the fixed check batch (1.0: the "
                     "mean image), best 0.50 at step 200; the last good checkpoint is run/checkpoint.pt (step 400; "
                     "the next save overwrites it), the last good one kept is run/checkpoint-0000300.pt (step 300)"]
    assert watch.best == 0.5 and watch.best_step == 200
    watch.check(700, lines.append)  # back down: the next collapse is reported again
    watch.check(800, lines.append)
    assert len(lines) == 2 and lines[1].startswith("vaegan: step 800:")
    assert lines[1].endswith("the last good checkpoint is run/checkpoint-0000300.pt (step 300)")


def test_the_last_good_checkpoint_when_only_checkpoint_pt_holds_it(monkeypatch):
    lines = []
    watch = watch_with_errors(monkeypatch, [0.4, 0.5, 1.5])
    watch.check(100, lines.append)
    watch.check(200, lines.append)
    watch.saved(200, ["run/checkpoint.pt"])
    watch.check(300, lines.append)
    assert lines[0].endswith("the last good checkpoint is run/checkpoint.pt (step 200; the next save overwrites it), "
                             "and none good is kept (--keep-every)")
    watch = watch_with_errors(monkeypatch, [0.4, 1.5])
    watch.check(100, lines.append)
    watch.saved(150, ["run/checkpoint.pt"])  # not checked at this step: not known to be good
    watch.check(200, lines.append)
    assert lines[1].endswith("no checkpoint was saved while the check was good")
    watch = watch_with_errors(monkeypatch, [0.4, 0.45, 1.5])
    watch.check(100, lines.append)
    watch.saved(100, ["run/checkpoint.pt"])
    watch.check(200, lines.append)
    watch.saved(200, ["run/checkpoint.pt"])
    watch.saved(250, ["run/checkpoint.pt"])  # unchecked, overwrites the good one
    watch.check(300, lines.append)
    assert lines[2].endswith("the last good checkpoint (step 200) has been overwritten since (--keep-every keeps copies)")


def test_the_trainer_logs_the_check_and_reports_a_collapse_in_one_line(tmp_path, monkeypatch, capsys):
    errors = iter([0.6, 0.5, 0.7, 1.8, 1.9])
    monkeypatch.setattr(collapse, "relative_reconstruction_error", lambda *args: next(errors))
    out = tmp_path / "run"
    trainer.train(TrainConfig(steps=20, log_every=4, collapse_check_every=4, keep_every=8, checkpoint_minutes=0,
                              sample_every=100, out=str(out), **TINY))
    with open(out / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [(r["step"], r.get("recon_check")) for r in records] == [(4, 0.6), (8, 0.5), (12, 0.7), (16, 1.8),
                                                                      (20, 1.9)]
    collapsed = [line for line in capsys.readouterr().err.splitlines() if "collapsed" in line]
    kept = os.path.join(str(out), "checkpoint-0000008.pt")
    assert collapsed == [f"vaegan: step 16: the reconstructions collapsed: error 1.80 on the fixed check batch (1.0: "
                         f"the mean image), best 0.50 at step 8; the last good checkpoint is {kept} (step 8)"]


def test_the_check_runs_on_the_real_model_and_can_be_turned_off(tmp_path):
    out = tmp_path / "run"
    trainer.train(TrainConfig(steps=6, log_every=3, collapse_check_every=3, sample_every=100, out=str(out), **TINY))
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert all(0 < r["recon_check"] < 100 for r in records) and len(records) == 2
    off = tmp_path / "off"
    trainer.train(TrainConfig(steps=3, log_every=3, collapse_check_every=0, sample_every=100, out=str(off), **TINY))
    assert "recon_check" not in json.loads(open(off / "metrics.jsonl").readline())


def bench_collapse():
    import importlib.util
    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("bench_collapse", os.path.join(ROOT, "bench", "collapse.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_statistics_path_is_what_the_shared_batchnorm_carries_and_nothing_else():
    bench = bench_collapse()
    torch.manual_seed(0)
    model = VAEGAN("vaegan", 32, 1, 16, 64, width=0.25)
    images = Images(40).images
    before = {name: b.clone() for name, b in model.named_buffers()}
    assert bench.statistics_path_share(model, images, 8, draws=2) > 0
    assert all(torch.equal(b, before[name]) for name, b in model.named_buffers())  # running statistics untouched
    for name, module in list(model.discriminator.named_modules()):
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            parent = model.discriminator.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model.discriminator
            setattr(parent, name.rsplit(".", 1)[-1], torch.nn.Identity())
    assert bench.statistics_path_share(model, images, 8, draws=2) == 0  # each image's logit its own: no path


def test_the_summary_counts_a_run_collapsed_at_the_end_only_above_the_mean_image_and_twice_its_best():
    runs = [{"variant": "v", "seed": 0, "heldout": {"100": 0.5, "200": 1.2}, "collapse_lines": ["vaegan: step 200"]},
            {"variant": "v", "seed": 1, "heldout": {"100": 0.6, "200": 1.1}, "collapse_lines": []},
            {"variant": "v", "seed": 2, "heldout": {"100": 0.4, "200": 0.9}, "collapse_lines": []}]
    row = bench_collapse().summarise(runs, 200)["v"]
    assert row["collapsed_seeds"] == [0] and row["reported_seeds"] == [0] and row["final"] == [1.2, 1.1, 0.9]


# The learning test: the digits (real images, in scikit-learn) at batch 16, the size at which the VAE/GAN was
# seen to collapse, in bench/learning.py's small networks, every training option at its default (gamma 1e-5 at
# 32 px): the first 600 steps of bench/results/collapse-20261205/'s 800-step runs (the learning rate anneals over
# 800), which ran at the earlier default, gamma 1e-6; the bound below is theirs (at 1e-5 it passed on 2026-12-05).
LEARNING_SEEDS = (0, 1)
LEARNING_STEPS = 600
# There, six seeds' held-out errors at step 600 (over the mean image's; running statistics) were 0.56-1.26, mean
# 0.88, standard deviation 0.29; the collapse reported on another image set rose to 1.7-2.0. The bound is the
# measured mean + 3 standard deviations (run as the experiment ran them, one thread each, seeds 0 and 1 repeat
# its checks exactly on this machine; elsewhere a run may follow another trajectory: only the spread carries over).
HELDOUT_BOUND = 0.88 + 3 * 0.29


@pytest.mark.slow
def test_vaegan_reconstructions_do_not_collapse_at_batch_16_on_the_digits(tmp_path):
    pytest.importorskip("sklearn", reason="the digits ship in scikit-learn (pip install -e '.[learning]')")
    import subprocess
    import sys

    import vaegan
    from conftest import ROOT, TRAIN
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import collapse as experiment  # bench/collapse.py
    train_dir, images = experiment.digits(str(tmp_path / "digits"))
    # as bench/collapse.py runs them: train.py, one thread each, the seeds side by side
    runs = {seed: subprocess.Popen([sys.executable, TRAIN, "--data", train_dir, "--image-size", "32", "--channels", "1",
                                    "--width", "0.25", "--latent-size", "32", "--fc-width", "256", "--batch-size", "16",
                                    "--steps", str(LEARNING_STEPS), "--lr-schedule-steps", "800", "--seed", str(seed),
                                    "--workers", "0", "--device", "cpu", "--kernels", "torch",
                                    "--collapse-check-every", "50", "--sample-every", "1000",
                                    "--out", str(tmp_path / f"seed{seed}")],
                                   stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT,
                                   env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
            for seed in LEARNING_SEEDS}
    errors, reported = {}, []
    for seed, run in runs.items():
        err = run.communicate(timeout=3600)[1]
        assert run.returncode == 0, err[-3000:]
        reported += [line for line in err.replace("\r", "\n").splitlines() if "collapsed" in line]
        errors[seed] = collapse.relative_reconstruction_error(vaegan.load(str(tmp_path / f"seed{seed}")), images)
    assert reported == [], reported
    assert all(error < HELDOUT_BOUND for error in errors.values()), errors


# The paper's networks at 32 px, batch 16, on the digits: at gamma 1e-6 (the 32 px default before the authors'
# 1e-5) seeds 1 and 5 collapsed to one image and were still far off at step 200 (held-out error over the mean
# image's 3.41 and 3.38); at 1e-5 they were at 1.07 and 1.00, and no seed of 7 went above 1.07 there
# (bench/results/collapse-seed1-20261205/, collapse-early-20261205/). The bound sits between: 2.0, about where
# the report's collapsed run on another image set ended (2.04).
PAPER_SEEDS = (1, 5)
PAPER_STEPS = 200
PAPER_BOUND = 2.0


@pytest.mark.slow
def test_the_paper_networks_decoder_does_not_collapse_on_the_seeds_where_gamma_1e_6_did(tmp_path):
    pytest.importorskip("sklearn", reason="the digits ship in scikit-learn (pip install -e '.[learning]')")
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from conftest import ROOT
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import collapse as experiment  # bench/collapse.py: its runs exactly, one thread each, side by side
    train_dir, images = experiment.digits(str(tmp_path / "digits"))

    def run(seed):
        out = str(tmp_path / f"seed{seed}")
        experiment.train(out, train_dir, seed, PAPER_STEPS, 16, experiment.NETWORKS["paper"], schedule_steps=800)
        return experiment.heldout_measures(os.path.join(out, f"checkpoint-{PAPER_STEPS:07d}.pt"), images)

    with ThreadPoolExecutor(len(PAPER_SEEDS)) as pool:
        measured = dict(zip(PAPER_SEEDS, pool.map(run, PAPER_SEEDS)))
    for seed, (error, recon_spread, sample_spread) in measured.items():
        assert error < PAPER_BOUND, measured
        assert recon_spread > 0.5 and sample_spread > 0.5, measured  # not one image whatever the input
