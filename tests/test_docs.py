"""The docs stay true to the code: every config key with its default, every command, every relative link.

docs/config.md keeps one table per section: a `## ` heading names the section(s) as `[name]` or
`[[name]]` in backticks (or reads "## Top level"), and each table row starts with the key in backticks,
then its default as TOML in backticks.
"""

import dataclasses
import re
import tomllib
import typing
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from odkd.cli import main
from odkd.config import PipelineConfig
from odkd.tomlwrite import as_toml_value

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
TOP_LEVEL = ""


def _default(field: dataclasses.Field):
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def config_keys() -> dict[str, dict[str, list]]:
    """{section: {key: the defaults it must document}}, walking PipelineConfig's dataclasses.

    A key's defaults are its field's default (a key left out of a written section) and, where a whole
    section left out gets another value (the senior teacher), that one too.
    """
    sections: dict[str, dict[str, list]] = {}

    def walk(cls, section: str, instance):
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.metadata.get("set_by_loader"):  # source, overrides, raw: not keys of the TOML
                continue
            tp = hints[field.name]
            dotted = f"{section}.{field.name}" if section else field.name
            if dataclasses.is_dataclass(tp):
                walk(tp, dotted, getattr(instance, field.name) if instance is not None else None)
            elif typing.get_origin(tp) is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0]):
                walk(typing.get_args(tp)[0], dotted, None)  # [[student.stages]]: an array of tables
            else:
                defaults = [as_toml_value(_default(field))]
                if instance is not None and as_toml_value(getattr(instance, field.name)) not in defaults:
                    defaults.append(as_toml_value(getattr(instance, field.name)))
                sections.setdefault(section, {})[field.name] = defaults

    walk(PipelineConfig, TOP_LEVEL, PipelineConfig())
    return sections


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


def documented_keys() -> dict[str, dict[str, str]]:
    """{section: {key: its default cell}} from docs/config.md's tables."""
    sections: dict[str, dict[str, str]] = {}
    current: list[str] = []
    for line in _outside_code((ROOT / "docs" / "config.md").read_text()).splitlines():
        if line.startswith("## "):
            current = [TOP_LEVEL] if line.strip() == "## Top level" else re.findall(r"`\[\[?([\w.]+)\]\]?`", line)
        elif line.startswith("| `") and current:
            key, default = _cells(line)[:2]
            for section in current:
                sections.setdefault(section, {})[key.strip("`")] = default
    return sections


def _toml_values(cell: str) -> list:
    values = []
    for literal in re.findall(r"`([^`]+)`", cell):
        try:
            values.append(tomllib.loads(f"v = {literal}")["v"])
        except tomllib.TOMLDecodeError:
            pytest.fail(f"docs/config.md: default `{literal}` is not a TOML value")
    return values


def test_config_md_documents_every_key_with_its_default():
    code, docs = config_keys(), documented_keys()
    assert sorted(docs) == sorted(code), "docs/config.md: sections differ from odkd/config.py's"
    for section, keys in code.items():
        name = f"[{section}]" if section else "the top level"
        assert sorted(docs[section]) == sorted(keys), f"docs/config.md {name}: keys differ from the code's"
        for key, defaults in keys.items():
            documented = _toml_values(docs[section][key])
            for default in defaults:
                assert default in documented, f"docs/config.md {name} {key}: default {default!r} not in {documented}"


def cli_commands(group: click.Group = main, parents: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command `odkd` runs, subcommands of groups included, as paths of names."""
    paths = []
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            paths += cli_commands(command, (*parents, name))
        else:
            paths.append((*parents, name))
    return paths


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def test_every_command_is_in_the_help_and_the_readme_table():
    commands = cli_commands()
    assert ("cache", "info") in commands and ("train-student",) in commands
    table = _section((ROOT / "README.md").read_text(), "## Commands")
    listed = [tuple(name.split()) for name in re.findall(r"^\| `odkd ([^`]+)` \|", table, flags=re.M)]
    assert sorted(listed) == sorted(commands), "README.md's command table differs from odkd's commands"
    runner = CliRunner()
    for *parents, name in commands:
        group_help = runner.invoke(main, [*parents, "--help"], prog_name="odkd")
        assert group_help.exit_code == 0, group_help.output
        assert re.search(rf"^\s+{re.escape(name)}\s", group_help.output, flags=re.M), f"odkd {' '.join(parents)} --help lacks {name}"
        own_help = runner.invoke(main, [*parents, name, "--help"], prog_name="odkd")
        assert own_help.exit_code == 0 and "Usage: odkd" in own_help.output, own_help.output


def test_the_link_parser_finds_the_readme_links():
    assert {"docs/config.md", "docs/demo-crops.png", "bench/RESULTS.md"} <= set(links(ROOT / "README.md"))


def test_every_command_has_a_section_in_commands_md():
    headings = [line for line in _outside_code((ROOT / "docs" / "commands.md").read_text()).splitlines()
                if line.startswith("#")]
    for path in cli_commands():
        assert any(f"`odkd {' '.join(path)}`" in h for h in headings), f"docs/commands.md: no heading for odkd {' '.join(path)}"


def test_the_demo_table_is_the_same_in_the_readme_and_results_md():
    def table(path):
        text = path.read_text()
        start = re.search(r"^\| model \|.*\| AP \|", text, re.MULTILINE).start()  # the report's header
        return text[start:text.index("\n\n", start)]

    assert table(ROOT / "README.md") == table(ROOT / "docs" / "results.md")


def _outside_code(text: str) -> str:
    """The text without fenced code blocks, whose lines are examples, not headings or links."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def links(page: Path) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", _outside_code(page.read_text()))
    return [target for target in LINK.findall(text) if not re.match(r"[a-zA-Z][\w+.-]*:", target)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    missing = [t for t in links(page) if t.split("#")[0] and not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page.relative_to(ROOT)}: links to missing files {missing}"


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: the text lowercased, punctuation dropped, spaces as hyphens."""
    found = set()
    for line in _outside_code(page.read_text()).splitlines():
        heading = re.match(r"#+ (.*)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).replace("`", "").lower()).replace(" ", "-")
            found.add(slug)
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_anchors_name_headings(page):
    for target in links(page):
        file, _, anchor = target.partition("#")
        linked = (page.parent / file).resolve() if file else page
        if anchor and linked.suffix == ".md" and linked.is_file():
            assert anchor in anchors(linked), f"{page.relative_to(ROOT)}: {target}: no such heading"


def _usages(command: tuple[str, ...]) -> list[str]:
    """The usages docs/commands.md gives of `odkd COMMAND`: its rows of the command table together (evaluate
    has one row per mode), then each synopsis (`odkd COMMAND [...`, continuation lines indented) of its
    section on its own."""
    text = (ROOT / "docs" / "commands.md").read_text()
    name = " ".join(command)
    rows = [cells[0].strip("`") for cells in map(_cells, text.splitlines())
            if cells and re.fullmatch(rf"`odkd {re.escape(name)}( [^`]*)?`", cells[0])]
    synopses = re.findall(rf"^odkd {re.escape(name)} \[.*(?:\n {{4,}}\[.*)*", text, flags=re.M)
    return [usage.replace("\\|", "|") for usage in [" ".join(rows), *synopses]]


def test_commands_md_gives_every_option_of_every_command_with_its_choices():
    """train-student's synopsis lacked --variant, export's row --device and --config, and evaluate's row said
    [--split val] where the option takes train|val|test|unlabeled."""
    for path in cli_commands():
        command = main
        for name in path:
            command = command.commands[name]
        usages = _usages(path)
        assert usages[0], f"docs/commands.md: no row of odkd {' '.join(path)} in the command table"
        for usage in usages:
            for param in command.params:
                if not isinstance(param, click.Option) or param.name in ("verbose", "quiet", "overrides"):
                    continue  # -v/-q and --set: documented once for every command
                for option in (o for o in (*param.opts, *param.secondary_opts) if o.startswith("--")):
                    assert re.search(rf"{re.escape(option)}(?![\w-])", usage), \
                        f"docs/commands.md: odkd {' '.join(path)} lacks {option} in: {usage}"
                if isinstance(param.type, click.Choice):
                    choices = "|".join(param.type.choices)
                    for shown in re.findall(rf"{re.escape(param.opts[-1])} ([\w|]+)", usage):
                        assert shown == choices, (f"docs/commands.md: odkd {' '.join(path)} {param.opts[-1]} "
                                                  f"{shown}, the option takes {choices}")


def test_no_page_says_an_epoch_visits_every_labelled_instance_without_the_dropped_batch():
    """The loader drops the last partial batch of each rank: where a page says an epoch holds every labelled
    instance once, the same paragraph says so."""
    for page in PAGES:
        for paragraph in re.split(r"\n\s*\n", page.read_text()):
            flat = " ".join(paragraph.split()).replace("**", "")
            if re.search(r"(visits|holds) every labelled instance once", flat):
                assert "partial batch" in flat, f"{page.relative_to(ROOT)}: {flat[:200]}"
