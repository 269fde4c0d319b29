"""Every command's `--help`: its own options, each with a line of help; and every option the README and docs/ give a
command appears in that command's help (or, for the commands that take train options, in train's)."""

import re
from pathlib import Path

import pytest

from fast_srt.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[2]
TAKES_TRAIN_OPTIONS = ("train", "plan", "sft", "bench")
PLACEHOLDERS = {"--options"}  # `fast-srt train [--options]` in the docs' usage lines
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9_.-]*[a-z0-9*]")


def _help(cmd, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "200")  # tyro and argparse wrap at the terminal's width
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code in (0, None)
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def helps():
    return {}


def _argparse_entries(text: str) -> dict[str, str]:
    """{option: its help text} from an argparse help's options section."""
    entries, current = {}, None
    section = text.split("options:", 1)[-1].split("\n\n")[0] if "options:" in text else ""
    for line in section.splitlines():
        m = re.match(r"^  (-\S.*?)(?:\s{2,}(\S.*))?$", line)
        if m:
            current = OPTION.findall(m.group(1))[-1] if OPTION.findall(m.group(1)) else m.group(1).split(",")[0]
            entries[current] = (m.group(2) or "").strip()
        elif current and line.startswith(" " * 6):
            entries[current] = (entries[current] + " " + line.strip()).strip()
    return entries


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_lists_the_commands_own_options_each_with_a_line_of_help(cmd, capsys, monkeypatch):
    text = _help(cmd, capsys, monkeypatch)
    assert f"fast-srt {cmd}" in text.replace("\n", " ")[:400], text[:400]
    if cmd in ("train", "play"):  # tyro over the typed config: the options are the config's fields
        assert "--sampling.games-per-step" in text and "--model.model" in text
        return
    entries = _argparse_entries(text)
    assert entries, text
    missing = [opt for opt, h in entries.items() if not h and opt not in ("-h", "--help")]
    assert not missing, f"fast-srt {cmd}: options without help: {missing}"
    if cmd in TAKES_TRAIN_OPTIONS:
        assert "fast-srt train --help" in text  # where the rest are listed


def _documented_options() -> dict[str, set[str]]:
    """{command: options written after `fast-srt COMMAND` on one line} in README.md and docs/*.md."""
    found: dict[str, set[str]] = {}
    pattern = re.compile(r"fast-srt (" + "|".join(map(re.escape, sorted(COMMANDS, key=len, reverse=True)))
                         + r")\b([^`\n]*)")
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for m in pattern.finditer(path.read_text()):
            opts = {o.rstrip("*").rstrip(".") for o in OPTION.findall(m.group(2))} - PLACEHOLDERS
            found.setdefault(m.group(1), set()).update(opts)
    return found


def test_every_option_the_docs_give_a_command_is_in_its_help(capsys, monkeypatch):
    helps = {cmd: _help(cmd, capsys, monkeypatch) for cmd in COMMANDS}
    documented = _documented_options()
    assert sum(map(len, documented.values())) >= 15  # the scan finds the docs' options
    unknown = []
    for cmd, opts in documented.items():
        text = helps[cmd] + (helps["train"] if cmd in TAKES_TRAIN_OPTIONS else "")
        unknown += [f"fast-srt {cmd} {o}" for o in sorted(opts) if o not in text]
    assert not unknown, f"options in the docs that --help does not list: {unknown}"
