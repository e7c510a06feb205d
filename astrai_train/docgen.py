"""`python -m astrai_train.docgen`: writes docs/configuration.md from the code, so it cannot rot.

Every table comes from a source of truth: the config dataclasses (field, type, default and the
one-line `# comment` written beside each field, read from the source by docgen_fields.py), the
YAML presets and recipes in configs/, and the argparse parser of every `astrai` subcommand.
tests/test_docs.py regenerates the page and fails when the committed file differs, so after
changing a config field, a preset, a recipe or a flag, run `python -m astrai_train.docgen`.

The output must not depend on the machine that generates it: paths are shown relative to the
repository, and a CLI default computed from the CPU count is shown as such, not as this host's.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any
from unittest import mock

from astrai_train.docgen_fields import MISSING_COMMENT, ROOT, FieldDoc, field_docs

OUT = ROOT / "docs" / "configuration.md"
__all__ = ["MISSING_COMMENT", "OUT", "render", "main"]

# (heading, how a user sets these values, dataclass path). Order is the page's order.
CONFIGS: list[tuple[str, str, str]] = [
    ("Model", "`config.json` of a model directory; the presets in `configs/model/`; a recipe's "
     "`model.overrides`", "astrai_train.model.config:ModelConfig"),
    ("Training recipe", "the YAML file given to `astrai train --config` (or `train.py`), plus "
     "`section.key=value` overrides on the command line", "astrai_train.objectives.config:Recipe"),
    ("Data module", "a recipe's `data:` section; `objective` defaults to the recipe's and "
     "`tokenizer_hash` to the training tokenizer's", "astrai_train.data.datamodule:DataConfig"),
    ("Prepare", "`astrai prepare` flags", "astrai_train.data.prepare:PrepareConfig"),
    ("Tasks", "`astrai tasks` flags", "astrai_train.data.tasks:TaskConfig"),
    ("Evaluation", "`astrai eval` flags", "astrai_train.evaluate:EvalConfig"),
    ("Serving engine", "`astrai serve` / `astrai generate` flags (`--field-name`), or keyword "
     "arguments of `LLMEngine` / `LLM`", "astrai_serve.engine.config:EngineConfig"),
    ("Sampling", "each request: the gRPC `SamplingParams` message, the OpenAI request fields, or "
     "`astrai_serve.SamplingParams` in Python", "astrai_serve.engine.sampling_params:SamplingParams"),
    ("REST facade", "`astrai gateway` flags (`astrai serve` uses the defaults)",
     "astrai_serve.facade.app:FacadeConfig"),
]


def cell(text: Any) -> str:
    """Prose safe inside a Markdown table cell (`<name>` would otherwise vanish as an HTML tag)."""
    return prose(text).replace("|", "\\|").replace("\n", " ")


def prose(text: Any) -> str:
    """Escape `<` and `*` outside code spans (the odd pieces between backticks are code)."""
    pieces = str(text).split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;").replace("*", "\\*") for i, p in enumerate(pieces))


def code(text: Any) -> str:
    """An inline code span in a table cell; only the pipe needs escaping there."""
    return "`" + str(text).replace("|", "\\|") + "`" if str(text) != "" else ""


def relative(text: str) -> str:
    return text.replace(f"{ROOT}{os.sep}", "").replace(str(ROOT), ".")


# ---- config tables ----------------------------------------------------------------------------

def _default(d: FieldDoc) -> str:
    if d.section is not None:
        name = d.section.partition(":")[2]
        return f"see [`{name}`](#{name.lower()})"
    if d.default is None:
        return "required"
    return code(relative(d.default)) + (f" ({code(d.expression)})" if d.expression else "")


def field_table(path: str) -> list[str]:
    lines = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    for d in field_docs(path):
        lines.append(f"| `{d.name}` | {code(d.type)} | {_default(d)} | {cell(d.comment)} |")
    return lines


def config_sections() -> list[str]:
    out: list[str] = []
    for heading, where, path in CONFIGS:
        name = path.partition(":")[2]
        out += [f"## {heading}: `{name}`", "", f"`{path.replace(':', '.')}` — set by {where}.", ""]
        out += field_table(path) + [""]
        for d in field_docs(path):  # a recipe's nested sections, each a table of its own
            if d.section is not None:
                out += [f"### {d.section.partition(':')[2]}", "", f"The recipe's `{d.name}:` section.", ""]
                out += field_table(d.section) + [""]
        if heading == "Model":
            out += preset_table()
        if heading == "Training recipe":
            out += recipe_table()
    return out


# ---- configs/ -----------------------------------------------------------------------------------

def _yaml_description(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines)


def preset_table() -> list[str]:
    from astrai_train.model.config import PRESET_DIR, ModelConfig

    out = ["### Presets (`configs/model/*.yaml`)", "",
           "`ModelConfig.from_preset(name)`, or `model.preset: name` in a recipe. The description is the "
           "YAML file's own comment.", "",
           "| preset | vocab | dim | layers | heads | KV heads | head dim | FFN | context | attention "
           "| tied | QK-norm | description |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- |"]
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        c = ModelConfig.from_preset(path.stem)
        attention = c.attention if c.attention == "gqa" else (
            f"mla (latent {c.kv_lora_rank}, rope {c.qk_rope_head_dim})")
        ffn = (f"{c.n_experts} experts × {c.resolved_moe_dim_ffn}, top-{c.n_experts_per_token}" if c.n_experts
               else c.dim_ffn)
        out.append(f"| `{path.stem}` | {c.vocab_size} | {c.dim} | {c.n_layers} | {c.n_heads} | "
                   f"{c.n_kv_heads if c.attention == 'gqa' else '—'} | {c.resolved_head_dim} | {ffn} | "
                   f"{c.max_len} | {attention} | {'yes' if c.tie_weight else 'no'} | "
                   f"{'yes' if c.use_qk_norm else 'no'} | {cell(_yaml_description(path))} |")
    return out + [""]


def recipe_table() -> list[str]:
    from astrai_train.objectives.config import load_recipe

    out = ["### Recipes (`configs/train/*.yaml`)", "", "`astrai train --config configs/train/<recipe>.yaml`.", "",
           "| recipe | objective | starts from | steps | batch | peak LR | description |",
           "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    for path in sorted((ROOT / "configs" / "train").glob("*.yaml")):
        r = load_recipe(path)
        start = f"preset `{r.model.preset}`" if r.model.init_from is None else f"`{r.model.init_from}`"
        batch = r.data.get("batch_size", "")
        out.append(f"| `{path.stem}` | {r.objective} | {start} | {r.trainer.max_steps} | {batch} | "
                   f"{r.optim.lr:g} | {cell(_yaml_description(path))} |")
    return out + [""]


# ---- the command line ---------------------------------------------------------------------------

def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _default_text(action: argparse.Action, other: argparse.Action) -> str:
    """The default as documentation shows it; `other` is the same action built for another CPU count."""
    if other.default != action.default:
        return f"CPU-dependent: {other.default} on 1 CPU, {action.default} on 64"
    if action.default in (None, argparse.SUPPRESS) or (action.nargs == 0 and action.default is False):
        return ""
    return relative(str(action.default))


def _help_text(action: argparse.Action, default: str, prog: str) -> str:
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    params.update(prog=prog, default=default)
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(c) for c in params["choices"])
    return relative(action.help % params)


def _argument(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    metavar = action.metavar or ("{" + ",".join(map(str, action.choices)) + "}" if action.choices else None) \
        or (action.dest.upper() if action.option_strings else action.dest)
    return f"{metavar} ..." if action.nargs in ("+", "*") else str(metavar)


def _option_table(parser: argparse.ArgumentParser, other: argparse.ArgumentParser) -> list[str]:
    twins = {a.dest: a for a in other._actions}
    out: list[str] = []
    # argparse's default groups (positionals, options) make one table; a named group gets its own.
    default_titles = ("positional arguments", "options", "optional arguments")
    groups: list[tuple[str, list[argparse.Action]]] = [("", [])]
    for group in parser._action_groups:
        if group.title in default_titles:
            groups[0][1].extend(group._group_actions)
        else:
            groups.append((f"*{group.title}*" + (f": {prose(group.description)}" if group.description else ""),
                           list(group._group_actions)))
    for title, group_actions in groups:
        actions = [a for a in group_actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
        if not actions:
            continue
        if title:
            out += [title, ""]
        out += ["| option | argument | default | description |", "| --- | --- | --- | --- |"]
        for a in actions:
            default = "required" if a.required and a.option_strings else _default_text(a, twins[a.dest])
            name = ", ".join(f"`{s}`" for s in a.option_strings) or f"`{_argument(a)}` (positional)"
            argument = code(_argument(a)) if a.option_strings else ""
            out.append(f"| {name} | {argument} | {cell(default)} | "
                       f"{cell(_help_text(a, default or 'none', parser.prog))} |")
        out.append("")
    return out


def _command(parser: argparse.ArgumentParser, other: argparse.ArgumentParser, level: int,
             describe: bool = True) -> list[str]:
    out: list[str] = []
    if describe and parser.description:
        out += [prose(relative(parser.description)), ""]
    out += _option_table(parser, other)
    children, twins = _subparsers(parser), _subparsers(other)
    groups: dict[tuple[str, ...], list[str]] = {}  # subcommands with identical options are documented once
    for name, child in children.items():
        groups.setdefault(tuple(_command(child, twins[name], level + 1, describe=False)), []).append(name)
    for body, names in groups.items():
        out += [f"{'#' * level} `{parser.prog} " + " | ".join(names) + "`", ""]
        descriptions = [(n, children[n].description) for n in names if children[n].description]
        if len(names) == 1:
            out += [prose(relative(d)) for _, d in descriptions] + ([""] if descriptions else [])
        elif descriptions:
            out += [f"- `{n}`: {prose(relative(d))}" for n, d in descriptions] + [""]
        out += list(body)
    if parser.epilog:
        out += [prose(relative(parser.epilog)), ""]
    return out


def cli_sections() -> list[str]:
    from astrai_train.cli import COMMANDS, build_parser

    out = ["## Command line: `astrai`", "",
           "Every subcommand of `astrai` (`astrai_train/cli/`), from its argparse parser. "
           "`astrai COMMAND --help` prints the same.", ""]
    for name in COMMANDS:
        parsers = []
        for cpus in (64, 1):  # built twice to tell a CPU-dependent default from a fixed one
            with mock.patch.object(os, "cpu_count", return_value=cpus):
                parsers.append(_subparsers(build_parser(name))[name])
        out += [f"### `astrai {name}`", "", *_command(parsers[0], parsers[1], 4)]
    return out


def render() -> str:
    lines = ["# Configuration reference", "",
             "<!-- Generated by `python -m astrai_train.docgen` from the source. Do not edit by hand: "
             "change the code (a field's comment, a flag's help) and regenerate. -->", "",
             "Every setting astrai reads, generated from the code that reads it. Unknown keys are "
             "rejected with an error naming the key.", "", "Contents:", ""]
    body = config_sections() + cli_sections()
    for line in body:
        if line.startswith("## "):
            title = line[3:].replace("`", "")
            anchor = "".join(c for c in title.lower().replace(" ", "-") if c.isalnum() or c in "-_")
            lines.append(f"- [{title}](#{anchor})")
    return "\n".join(lines + [""] + body).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m astrai_train.docgen", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"file to write (default: {OUT.relative_to(ROOT)})")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file is out of date")
    parser.add_argument("--stdout", action="store_true", help="print the page instead of writing it")
    args = parser.parse_args(argv)
    try:
        text = render()
    except (ValueError, FileNotFoundError) as exc:  # a config class docgen cannot read: say which
        print(f"docgen: error: {exc}", file=sys.stderr)
        return 2
    if args.stdout:
        sys.stdout.write(text)
        return 0
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is out of date: run `python -m astrai_train.docgen`", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
