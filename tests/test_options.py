"""The options declared once (vaegan/config.py): the parser, --help and docs/options.md built from the
declarations; config.json's run facts apart from the machine's choices, and a resume that chooses them again."""
import argparse
import dataclasses
import json
import os
import re

import pytest
import torch

from conftest import ROOT
from datagen import make_folder
from vaegan import checkpoint, trainer
from vaegan.config import (GROUPS, MACHINE_CHOICES, RESUMABLE_OVERRIDES, TrainConfig, add_train_arguments,
                           config_json, help_text, option, options_markdown, run_facts)
from vaegan.options import RUN_DECISIONS


def declaration_problems(declarations, build=add_train_arguments):
    """What is wrong with a set of option declarations, as a list of sentences (none: all is well)."""
    parser = build(argparse.ArgumentParser(), declarations)
    problems = []
    for f in dataclasses.fields(declarations):
        if not f.metadata.get("help", "").strip():
            problems.append(f"{f.name} has no help")
        if f.metadata.get("group") not in GROUPS:
            problems.append(f"{f.name} is in no --help group")
    parsed = vars(parser.parse_args([]))
    for f in dataclasses.fields(declarations):
        if f.name not in parsed:
            problems.append(f"{f.name} has no option")
        elif parsed[f.name] != f.default or type(parsed[f.name]) is not type(f.default):
            problems.append(f"{f.name}: the parser's default {parsed[f.name]!r} is not the dataclass's {f.default!r}")
    return problems


def test_every_declaration_has_help_a_group_and_the_dataclass_default():
    assert declaration_problems(TrainConfig) == []


def test_a_declaration_without_help_or_with_another_default_is_caught():
    @dataclasses.dataclass
    class Broken:
        quiet: int = option(1, "training", "")
        drifted: int = option(2, "training", "a number", parse=int)

    def drifting_parser(parser, declarations):
        return add_train_arguments(parser, declarations).set_defaults(drifted=3) or parser
    assert declaration_problems(Broken, drifting_parser) == [
        "quiet has no help", "drifted: the parser's default 3 is not the dataclass's 2"]


def test_the_parser_reads_switches_choices_and_values_as_declared():
    parser = add_train_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--no-flip", "--no-equilibrium", "--compile", "--no-pad-channels", "--sync-bn",
                              "--batch-size", "8", "--lr", "1e-3", "--memory-format", "contiguous"])
    assert (args.flip, args.equilibrium, args.compile, args.pad_channels, args.sync_bn) == (False, False, True,
                                                                                          False, True)
    assert (args.batch_size, args.lr, args.memory_format) == (8, 1e-3, "contiguous")
    for bad in (["--batch-size", "0"], ["--memory-format", "planar"], ["--lr", "nan"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_help_is_grouped_and_cites_only_measured_files():
    parser = add_train_arguments(argparse.ArgumentParser())
    text = parser.format_help()
    positions = [text.index(f"\n{group}:\n") for group in GROUPS]
    assert positions == sorted(positions)
    speed = text[text.index("\nspeed and levers:\n"):text.index("\ndistributed:\n")]
    assert "--memory-format" in speed and "--compile" in speed and "--loader" in speed and "--batch-size" not in speed
    for f in dataclasses.fields(TrainConfig):
        for path in re.findall(r"bench/results/[\w./-]*\w", help_text(f)):
            assert os.path.exists(os.path.join(ROOT, path)), (f.name, path)
    memory_format = help_text(TrainConfig.__dataclass_fields__["memory_format"])
    assert "faster" not in memory_format and "0.85x" in memory_format


def test_docs_options_md_is_generated_from_the_declarations():
    with open(os.path.join(ROOT, "docs", "options.md")) as f:
        committed = f.read()
    assert committed == options_markdown(), "docs/options.md is stale: python -m vaegan.config > docs/options.md"
    for f in dataclasses.fields(TrainConfig):
        assert f"`--{f.name.replace('_', '-')}`" in committed or f.metadata["flag"] in committed


def test_the_run_facts_and_the_machine_choices_are_apart():
    assert {"device", "workers", "loader", "data_cache", "compile", "cuda_graphs", "memory_format",
            "optimizer_impl"} <= set(MACHINE_CHOICES)
    facts = run_facts(TrainConfig().resolved())
    assert {"model", "data", "image_size", "batch_size", "steps", "lr_schedule", "seed", "precision", "kernels",
            "augment", "gamma"} <= set(facts)
    assert not set(facts) & set(MACHINE_CHOICES) and set(RUN_DECISIONS) <= set(facts)
    assert set(MACHINE_CHOICES) <= set(RESUMABLE_OVERRIDES) and "model" not in RESUMABLE_OVERRIDES
    written = config_json(TrainConfig(workers=3), {"workers": "requested"})
    assert written["machine"]["workers"] == 3 and "workers" not in written["run"]
    assert written["reasons"] == {"workers": "requested"}


def test_workers_are_the_machines_cores_for_image_files_and_none_for_data_in_memory(tmp_path):
    from vaegan import options
    from vaegan.config import default_workers
    from vaegan.data import build_dataset
    make_folder(tmp_path / "data", n=4)
    cpu = torch.device("cpu")
    for data, expected in ((str(tmp_path / "data"), default_workers()), ("builtin:faces", 0)):
        cfg = TrainConfig(data=data, device="cpu", out="unused").resolved()
        dataset = build_dataset(cfg.data, "train", cfg.image_size, cfg.channels)
        resolved, reasons = options.resolve(cfg, cpu, 1, dataset)
        assert resolved.workers == expected and reasons["workers"].startswith("default")
    resolved, reasons = options.resolve(TrainConfig(workers=3, out="unused"), cpu, 1, dataset)
    assert (resolved.workers, reasons["workers"]) == (3, "requested")


# tiny networks, 12 image files: the first run's machine choices, and others on resume
TINY = dict(image_size=32, latent_size=16, fc_width=64, width=0.25, batch_size=4, device="cpu", log_every=1,
            sample_every=1000, lr_schedule_steps=3, augment="flip")
FIRST = dict(workers=0, data_cache="none", memory_format="channels-last", optimizer_impl="foreach")
OTHER = dict(workers=1, data_cache="host", memory_format="contiguous", optimizer_impl="for-loop",
             decoder_call="joint")
# The step after the resume against the uninterrupted run's: its losses (relative), and its update of the
# parameters (the norm of the difference of the two updates over the norm of the uninterrupted one's)
TOLERANCE = {"fp32": (1e-4, 1e-4), "bf16": (3e-2, 0.1)}


def train(out, explicit=(), **values):
    cfg = TrainConfig(out=str(out), **values)
    cfg.explicit = set(explicit)
    return trainer.train(cfg)


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])
def test_a_resume_chooses_the_machine_again_and_takes_the_same_next_step(tmp_path, precision, capfd):
    data = tmp_path / "data"
    make_folder(data, n=12)
    common = dict(TINY, data=str(data), precision=precision)
    whole = train(tmp_path / "whole", steps=3, **common, **FIRST).model
    train(tmp_path / "half", steps=2, **common, **FIRST)
    saved = checkpoint.load(str(tmp_path / "half"))
    assert not set(saved["config"]) & set(MACHINE_CHOICES) and saved["config"]["precision"] == precision
    resumed = train(tmp_path / "half", explicit=("steps", "resume", *OTHER), steps=3,
                    resume=str(tmp_path / "half"), **OTHER).model
    assert "this machine's choices, made again: device cpu" in capfd.readouterr().err
    config = json.loads((tmp_path / "half" / "config.json").read_text())
    assert {name: config["machine"][name] for name in OTHER} == OTHER
    records = {"out", "resume"}
    assert ({k: v for k, v in config["run"].items() if k not in records}
            == {k: v for k, v in json.loads((tmp_path / "whole" / "config.json").read_text())["run"].items()
                if k not in records})
    assert config["reasons"]["precision"] == config["reasons"]["kernels"] == "kept from the run's start"

    def log(run):
        return [json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")]
    loss_tolerance, update_tolerance = TOLERANCE[precision]
    after_whole, after_resume = log("whole")[-1], log("half")[-1]
    assert after_whole["step"] == after_resume["step"] == 3
    for name in ("kl", "llike", "dis_loss", "gen_loss", "real_cost", "fake_cost"):
        assert after_resume[name] == pytest.approx(after_whole[name], rel=loss_tolerance), name
    assert after_resume["update_decoder"] == after_whole["update_decoder"]
    before = saved["model"]
    update_whole = torch.cat([(p.detach() - before[name]).flatten() for name, p in whole.named_parameters()])
    update_resumed = torch.cat([(p.detach() - before[name]).flatten() for name, p in resumed.named_parameters()])
    assert update_whole.norm() > 0
    assert (update_resumed - update_whole).norm() / update_whole.norm() < update_tolerance
