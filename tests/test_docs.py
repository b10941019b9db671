"""The docs cannot drift from the code: every result file, option, command and link they name exists.

Checked in README.md, docs/*.md, bench/README.md and the commands' `--help`: each `bench/results/...`
path exists; each `--option` belongs to the command it is written for (a paragraph's options to
`train.py`, or to the `vaegan` subcommands, bench scripts and tools the paragraph names); each
`vaegan ...`, `python train.py ...` or `torchrun ... train.py ...` in a fenced shell block parses with
its own parser (in-process, stopped before it runs), and each python block compiles; each relative
Markdown link resolves, anchor included.
"""
import argparse
import contextlib
import functools
import glob
import io
import os
import re
import shlex

import pytest

from vaegan import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "bench/README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
README_MAX_LINES = 250
DOCS_PAGE_MAX_LINES = 299

FENCE = re.compile(r"^[ \t]*```([\w-]*)[ \t]*\n(.*?)^[ \t]*```[ \t]*$", re.M | re.S)
SHELL_BLOCKS = {"", "sh", "bash", "shell", "console"}
RESULTS_PATH = re.compile(r"bench/results/[^\s`'\"()\[\]<>|,;*]*")
OPTION = re.compile(r"(?<![\w/-])--[a-z][a-z0-9_-]*[a-z0-9]")
SUBCOMMAND = re.compile(r"\bvaegan (" + "|".join(re.escape(c) for c in cli.COMMANDS) + r")\b")
SCRIPT = re.compile(r"\b(?:bench|tests|kernels)/[\w/]+\.py\b")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# Options of the other programs the docs show, keyed by the word that names the program in a paragraph.
TOOL_OPTIONS = {
    "pip": {"--index-url", "--no-build-isolation", "--no-deps"},
    "torchrun": {"--nproc_per_node", "--nnodes", "--rdzv_backend", "--rdzv_endpoint", "--rdzv_id"},
    "pytest": {"--benchmark-json"},
    "tensorboard": {"--logdir"},
}


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def fenced_blocks(text):
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def prose(text):
    return FENCE.sub("", text)


class _Parsed(Exception):
    pass


def run_parser(command, argv):
    """`vaegan COMMAND ARGV` parsed by the command's own parser and stopped before the command runs.
    Returns (parser, exit status: 0 parsed or --help, 2 rejected, with argparse's message)."""
    seen = {}
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        seen["parser"] = self
        original(self, args, namespace)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_and_stop
    messages = io.StringIO()
    status = 0
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(messages):
            cli.COMMANDS[command](list(argv))
    except _Parsed:
        pass
    except SystemExit as e:
        status = e.code
    finally:
        argparse.ArgumentParser.parse_args = original
    assert "parser" in seen, f"vaegan {command} returned without parsing its arguments"
    return seen["parser"], status, messages.getvalue().strip()


@functools.lru_cache(maxsize=None)
def options_of(command):
    parser, _, _ = run_parser(command, ["--help"])
    return frozenset(s for action in parser._actions for s in action.option_strings)


@functools.lru_cache(maxsize=None)
def help_of(command):
    parser, _, _ = run_parser(command, ["--help"])
    return parser.format_help()


def script_options(path):
    """The options a script of this repository declares (its source names each as a string)."""
    source = read(path)
    return {o for o in OPTION.findall(source) if f'"{o}"' in source or f"'{o}'" in source}


def shell_commands(block):
    """Each command of a shell block as tokens: continuation lines joined, comments dropped, split at
    `&&`, `||`, `;` and `|`."""
    for line in block.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        command = []
        for token in tokens + ["&&"]:
            if token in ("&&", "||", ";", "|"):
                if command:
                    yield command
                command = []
            else:
                command.append(token)


def classify(tokens):
    """('vaegan', SUBCOMMAND, ARGS) for the trainer's commands, ('script', PATH, ARGS) for a repository
    script run by python, else ('tool', NAME, ARGS)."""
    if tokens[0] == "vaegan":
        return ("vaegan", tokens[1] if len(tokens) > 1 else None, tokens[2:])
    if tokens[0] == "torchrun" and "train.py" in tokens:
        return ("vaegan", "train", tokens[tokens.index("train.py") + 1:])
    if tokens[0] in ("python", "python3"):
        if tokens[1:3] == ["-m", "vaegan"]:
            return ("vaegan", tokens[3] if len(tokens) > 3 else None, tokens[4:])
        if len(tokens) > 1 and tokens[1] == "train.py":
            return ("vaegan", "train", tokens[2:])
        if len(tokens) > 1 and tokens[1].endswith(".py"):
            return ("script", tokens[1], tokens[2:])
    return ("tool", tokens[0], tokens[1:])


def command_problems(text):
    problems = []
    for language, block in fenced_blocks(text):
        if language == "python":
            try:
                compile(block, "<docs>", "exec")
            except SyntaxError as e:
                problems.append(f"a python block does not compile: {e}")
        if language not in SHELL_BLOCKS:
            continue
        for tokens in shell_commands(block):
            kind, name, args = classify(tokens)
            shown = " ".join(tokens)
            if kind == "vaegan":
                if name not in cli.COMMANDS:
                    problems.append(f"`{shown}`: no such vaegan command {name!r}")
                    continue
                _, status, message = run_parser(name, args)
                if status != 0:
                    problems.append(f"`{shown}` does not parse: {message.splitlines()[-1] if message else status}")
            elif kind == "script":
                if not os.path.isfile(os.path.join(ROOT, name)):
                    problems.append(f"`{shown}`: {name} does not exist")
                    continue
                unknown = [o for o in OPTION.findall(" ".join(args)) if o not in script_options(name)]
                if unknown:
                    problems.append(f"`{shown}`: {name} declares no {', '.join(unknown)}")
    return problems


def option_problems(text):
    """Options outside fenced blocks, paragraph by paragraph: each must belong to train.py, or to a
    vaegan subcommand, repository script or tool that the paragraph names."""
    problems = []
    for paragraph in re.split(r"\n\s*\n", prose(text)):
        named = set(OPTION.findall(paragraph))
        if not named:
            continue
        allowed = set(options_of("train"))
        for command in SUBCOMMAND.findall(paragraph):
            allowed |= options_of(command)
        for script in SCRIPT.findall(paragraph):
            if os.path.isfile(os.path.join(ROOT, script)):
                allowed |= script_options(script)
        for tool, options in TOOL_OPTIONS.items():
            if re.search(rf"\b{tool}\b", paragraph):
                allowed |= options
        problems += [f"{option} (in: {paragraph.strip()[:80]!r}...)" for option in sorted(named - allowed)]
    return problems


def results_problems(text):
    paths = {p.rstrip(".") for p in RESULTS_PATH.findall(text)}
    return [p for p in sorted(paths) if not os.path.exists(os.path.join(ROOT, p))]


def heading_anchor(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors_of(path):
    return {heading_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", prose(read(path)), re.M)}


def link_problems(path, text):
    problems = []
    for target in LINK.findall(prose(text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue  # a URL
        file, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(os.path.join(ROOT, resolved)):
            problems.append(f"{target}: {resolved} does not exist")
        elif anchor and resolved.endswith(".md") and anchor not in anchors_of(resolved):
            problems.append(f"{target}: {resolved} has no heading #{anchor}")
    return problems


@pytest.mark.parametrize("path", DOCS)
def test_every_results_file_named_exists(path):
    assert results_problems(read(path)) == []


@pytest.mark.parametrize("path", DOCS)
def test_every_option_named_belongs_to_its_command(path):
    assert option_problems(read(path)) == []


@pytest.mark.parametrize("path", DOCS)
def test_every_command_in_a_code_block_parses(path):
    assert command_problems(read(path)) == []


@pytest.mark.parametrize("path", DOCS)
def test_every_relative_link_resolves(path):
    assert link_problems(path, read(path)) == []


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_help_names_only_existing_options_and_results(command):
    text = help_of(command)
    assert results_problems(text) == []
    # a help text may name the command's own options and the trainer's
    assert sorted(set(OPTION.findall(text)) - options_of(command) - options_of("train")) == []


def test_readme_is_short_and_links_every_docs_page():
    readme = read("README.md")
    assert len(readme.splitlines()) <= README_MAX_LINES
    linked = {os.path.normpath(target.partition("#")[0]) for target in LINK.findall(prose(readme))}
    pages = [p for p in DOCS if p.startswith("docs" + os.sep) or p.startswith("docs/")]
    assert pages, "no docs/ pages"
    assert [p for p in pages if p not in linked] == []
    assert {p: len(read(p).splitlines()) for p in pages if len(read(p).splitlines()) > DOCS_PAGE_MAX_LINES} == {}


def test_the_readme_shows_what_ci_runs_verbatim():
    ci = [line.strip() for line in read(".ci/run").splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci, ".ci/run runs nothing"
    readme = read("README.md")
    assert [line for line in ci if line not in readme] == []


def test_the_checks_catch_what_drifted():
    bad = "\n".join([
        "Figures in `bench/results/no-such-file.txt`; see [the page](docs/no-such-page.md) and",
        "[training](docs/training.md#no-such-heading). Train with `--no-such-option`.",
        "",
        "`vaegan eval` takes --num-samples, not --num-train.",
        "",
        "```",
        "python train.py --steps ten",
        "vaegan eval --num-samples 10",
        "torchrun --nproc_per_node=8 train.py --batch-size 64 --no-such-option",
        "vaegan evaluate runs/x",
        "python bench/no_such_script.py --out x",
        "python bench/learning.py --no-such-flag",
        "```",
        "```python",
        "model = vaegan.load(",
        "```",
    ])
    assert results_problems(bad) == ["bench/results/no-such-file.txt"]
    assert len(link_problems("README.md", bad)) == 2
    flagged = option_problems(bad)
    assert [p.split()[0] for p in flagged] == ["--no-such-option", "--num-train"]
    problems = command_problems(bad)
    assert len(problems) == 7, problems
    assert "--steps" in problems[0] and "run" in problems[1]  # a bad value; eval's missing run directory
    good = "```\npython train.py --steps 10 --data builtin:faces\nvaegan eval runs/x --num-samples 10\n```\n"
    assert command_problems(good) == [] and option_problems("Use `--steps` and `--gamma`.") == []
