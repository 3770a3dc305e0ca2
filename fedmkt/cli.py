"""The `fedmkt` command: `fit`, `evaluate`, `map-vocab` and `align-text`, each mapped to a plain function.

`--config NAME` accepts a path, or the bare name of a shipped config (`demo`, `tiny.yaml`,
`heterogeneous.yaml`, …) which resolves to the `lightning_configs/` folder. Any key can be
overridden on the command line (`--transfer.top_k 8`), `--print_config` shows the resolved
config, and `fit` saves it in the run directory. User errors print one line naming the problem
and the fix; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import sys
import warnings
from importlib import resources
from pathlib import Path
from typing import Literal, Optional

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from fedmkt.config import RunConfig
from fedmkt.errors import FedMKTError

set_parsing_settings(docstring_parse_attribute_docstrings=True)


def shipped_configs() -> dict[str, Path]:
    """The YAML configs installed with fedmkt, by file name."""
    folder = resources.files("fedmkt.lightning_configs")
    return {entry.name: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def resolve_config_path(value: str) -> str:
    """A path stays a path; a bare name (with or without `.yaml`) becomes a shipped config."""
    if Path(value).exists():
        return value
    shipped = shipped_configs()
    for name in (value, f"{value}.yaml"):
        if name in shipped and "/" not in value:
            return str(shipped[name])
    raise FedMKTError(
        f"config file `{value}` not found. Fix: give an existing path or a shipped config name ({', '.join(sorted(shipped))})."
    )


def _resolve_config_arguments(argv: list[str]) -> list[str]:
    resolved = list(argv)
    for i, arg in enumerate(resolved):
        if arg == "--config" and i + 1 < len(resolved):
            resolved[i + 1] = resolve_config_path(resolved[i + 1])
        elif arg.startswith("--config="):
            resolved[i] = "--config=" + resolve_config_path(arg.split("=", 1)[1])
    return resolved


def _run_parser(description: str) -> ArgumentParser:
    parser = ArgumentParser(description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config: a path or a shipped name (demo, tiny, heterogeneous, …).")
    parser.add_class_arguments(RunConfig)
    return parser


def _fit_parser() -> ArgumentParser:
    parser = _run_parser("Run FedMKT rounds end to end.")
    parser.add_argument("--resume", type=Optional[str], default=None, help="Continue the interrupted run in this run_dir from its last round checkpoint.")
    parser.add_argument(
        "--backend", type=Optional[Literal["inprocess", "flower"]], default=None,
        help="Shorthand for --federation.backend: inprocess, or flower (submit the run to the SuperLink in `flower.superlink`).",
    )
    return parser


def _evaluate_parser() -> ArgumentParser:
    parser = _run_parser("Score one party (base model + optional LoRA adapter) on the run's held-out split.")
    parser.add_argument("--party", type=str, default="server", help="server, client_0, client_1, …")
    parser.add_argument("--adapter", type=Optional[str], default=None, help="LoRA adapter folder (e.g. RUN_DIR/adapters/round_2/server).")
    return parser


def _map_vocab_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Precompute a MinED vocabulary map between two tokenizers.", exit_on_error=False)
    parser.add_argument("--src", type=str, required=True, help="Source model spec: hub name, local dir, .gguf file or embedded:NAME.")
    parser.add_argument("--dst", type=str, required=True, help="Destination model spec (same forms as --src).")
    parser.add_argument("--out", type=str, required=True, help="Output JSON: source token string -> destination token string.")
    parser.add_argument("--cache_dir", type=Optional[str], default=None, help="Cache folder (default $FEDMKT_CACHE or ~/.cache/fedmkt).")
    return parser


def _align_text_parser() -> ArgumentParser:
    parser = ArgumentParser(
        description="Show how a teacher's (--src) positions land on a receiver's (--dst) for one text.", exit_on_error=False
    )
    parser.add_argument("--src", type=str, required=True, help="Teacher model spec (same forms as map-vocab).")
    parser.add_argument("--dst", type=str, required=True, help="Receiver model spec (same forms as map-vocab).")
    parser.add_argument("--text", type=str, required=True, help="The text both tokenizers encode.")
    parser.add_argument(
        "--sequence-alignment", "--sequence_alignment", dest="sequence_alignment", type=Literal["dtw", "offsets"],
        default="offsets", help="How positions are matched, as transfer.sequence_alignment: offsets or dtw.",
    )
    parser.add_argument("--json", action="store_true", help="Print a JSON list of rows instead of a table.")
    parser.add_argument("--cache_dir", type=Optional[str], default=None, help="Cache folder (default $FEDMKT_CACHE or ~/.cache/fedmkt).")
    return parser


def _run_config(parser: ArgumentParser, namespace) -> RunConfig:
    """Instantiate the typed RunConfig from a parsed sub-command namespace."""
    values = parser.instantiate(namespace.clone())
    return RunConfig(**{key: values[key] for key in RunConfig.__dataclass_fields__})


def _fit(parser: ArgumentParser, namespace) -> None:
    from fedmkt.run import fit

    resume, backend = namespace.pop("resume"), namespace.pop("backend")
    if backend is not None:
        namespace["federation.backend"] = backend
    if namespace["federation.backend"] == "flower":
        from fedmkt.federation.flower.submit import submit

        if resume is not None:
            raise FedMKTError(
                "--resume is not supported on the flower backend (each client's adapter lives on its SuperNode, not in the "
                "run_dir checkpoint). Fix: start the run afresh, or rerun it with --backend inprocess to use --resume."
            )
        namespace.run_dir = str(Path(namespace.run_dir).expanduser().resolve())  # the ServerApp starts in the SuperLink's folder
        submit(_run_config(parser, namespace), resolved_config=parser.dump(namespace))
        return
    config = _run_config(parser, namespace)
    fit(config, resolved_config=parser.dump(namespace), resume=resume)


def _evaluate(parser: ArgumentParser, namespace) -> None:
    from fedmkt.run import evaluate_party

    scores = evaluate_party(_run_config(parser, namespace), namespace.party, namespace.adapter)
    print(" ".join(f"{key}={value:.4f}" for key, value in scores.items()))


def _map_vocab(parser: ArgumentParser, namespace) -> None:
    from fedmkt.alignment.vocab_map import write_vocab_map_json
    from fedmkt.config import ModelSpec
    from fedmkt.models import cache_root, load_tokenizer

    cache = namespace.cache_dir
    source, target = load_tokenizer(ModelSpec(namespace.src), cache), load_tokenizer(ModelSpec(namespace.dst), cache)
    print(f"wrote {write_vocab_map_json(source, target, namespace.out, cache_dir=cache_root(cache) / 'vocab_maps')}")


def _align_text(parser: ArgumentParser, namespace) -> None:
    import json

    from fedmkt.alignment import TokenAligner
    from fedmkt.alignment.report import alignment_rows, format_rows
    from fedmkt.config import ModelSpec
    from fedmkt.models import cache_root, load_tokenizer

    if not namespace.text:
        raise FedMKTError("--text is empty. Fix: pass the text both tokenizers should encode, e.g. --text 'The quick fox'.")
    cache = namespace.cache_dir
    teacher, receiver = load_tokenizer(ModelSpec(namespace.src), cache), load_tokenizer(ModelSpec(namespace.dst), cache)
    aligner = TokenAligner(teacher, receiver, cache_root(cache) / "vocab_maps", namespace.sequence_alignment)
    rows = alignment_rows(aligner, namespace.text)
    print(json.dumps(rows, ensure_ascii=False) if namespace.json else format_rows(rows, namespace.text))


SUBCOMMANDS = {
    "fit": (_fit_parser, _fit, "Run FedMKT rounds end to end."),
    "evaluate": (_evaluate_parser, _evaluate, "Score a party on the held-out evaluation split."),
    "map-vocab": (_map_vocab_parser, _map_vocab, "Precompute a MinED vocabulary map."),
    "align-text": (_align_text_parser, _align_text, "Show how a teacher's positions align to a receiver's on one text."),
}
"""Subcommand → (its parser, the plain function it runs, one-line help)."""


def build_parser() -> tuple[ArgumentParser, dict[str, ArgumentParser]]:
    """The top-level parser and its sub-parsers by subcommand name."""
    parser = ArgumentParser(prog="fedmkt", description="FedMKT: federated mutual knowledge transfer between an LLM and SLMs.", exit_on_error=False)
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks instead of one-line errors.")
    subcommands = parser.add_subcommands()
    sub_parsers = {}
    for name, (make_parser, _, help_text) in SUBCOMMANDS.items():
        sub_parsers[name] = make_parser()
        subcommands.add_subcommand(name, sub_parsers[name], help=help_text)
    return parser, sub_parsers


def parse_run_config(args: list[str]) -> RunConfig:
    """The RunConfig that `fedmkt fit ARGS` would run (used by tests and notebooks)."""
    parser, sub_parsers = build_parser()
    namespace = parser.parse_args(["fit", *_resolve_config_arguments(args)])
    return _run_config(sub_parsers["fit"], namespace["fit"])


def run_config_from_text(text: str) -> RunConfig:
    """The RunConfig of a resolved config (the YAML `fedmkt fit` saves as `config.yaml`).

    The Flower backend ships this text to the ServerApp and every ClientApp, so all parties parse
    one config exactly as the command line did.
    """
    parser = _run_parser("config")
    return _run_config(parser, parser.parse_string(text))


def _dispatch(argv: list[str]) -> None:
    parser, sub_parsers = build_parser()
    namespace = parser.parse_args(_resolve_config_arguments(argv))
    command = namespace.subcommand
    SUBCOMMANDS[command][1](sub_parsers[command], namespace[command])


def main(argv: Optional[list[str]] = None) -> int:
    """Console entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:  # accepted anywhere on the line, like other global flags
        argv = ["--debug"] + [arg for arg in argv if arg != "--debug"]
    else:  # library deprecation chatter would bury the one line that matters
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        _dispatch(argv)
    except FedMKTError as error:
        if debug:
            raise
        print(f"fedmkt: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # jsonargparse reports config problems as ArgumentError
        if debug or type(error).__name__ != "ArgumentError":
            raise
        problem = " ".join(str(error).split())
        print(
            f"fedmkt: config error: {problem}. Fix: correct that key or value (see `fedmkt fit --help`, or `--print_config` for the resolved config).",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
