"""The `fedmkt` command: `fit`, `launch-local`, `evaluate`, `map-vocab` and `align-text`, each mapped to a plain function.

`--config NAME` accepts a path, or the bare name of a shipped config (`demo`, `tiny.yaml`,
`heterogeneous.yaml`, …) which resolves to the `lightning_configs/` folder (see `fedmkt.config`). Any key can be
overridden on the command line (`--transfer.top_k 8`), `--print_config` shows the resolved
config, and `fit` saves it in the run directory. User errors print one line naming the problem
and the fix; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import signal
import sys
import warnings
from pathlib import Path
from typing import Literal, Optional

from jsonargparse import ArgumentParser

from fedmkt.config import (
    DataConfig,
    expand_client_overrides,
    resolve_config_arguments,
    run_config_from_namespace,
    run_config_parser,
)
from fedmkt.errors import FedMKTError, RunInterrupted
from fedmkt.interrupts import stop_on_signals


def _fit_parser() -> ArgumentParser:
    parser = run_config_parser("Run FedMKT rounds end to end.")
    parser.add_argument(
        "--resume",
        type=Optional[str],
        default=None,
        help="Continue the interrupted run in this run_dir from its last round checkpoint.",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace the run already in run_dir (its config, summary, checkpoint, adapters and logs).",
    )
    parser.add_argument(
        "--backend",
        type=Optional[Literal["inprocess", "flower"]],
        default=None,
        help="Shorthand for --federation.backend: inprocess, or flower (submit the run to the SuperLink in `flower.superlink`).",
    )
    return parser


def _launch_local_parser() -> ArgumentParser:
    parser = run_config_parser(
        "Run FedMKT on a Flower federation on this machine: a SuperLink and one SuperNode per client on 127.0.0.1."
    )
    parser.add_argument(
        "--gpus",
        type=Optional[str],
        default=None,
        help="GPU indices, e.g. 0,1: the server runs on the first, the clients' SuperNodes on the following ones in turn "
        "(CUDA_VISIBLE_DEVICES).",
    )
    parser.add_argument(
        "--resume",
        type=Optional[str],
        default=None,
        help="Continue the interrupted run in this run_dir from its last round checkpoint; each client's node restores "
        "its adapter from run_dir.",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace the run already in run_dir (its config, summary, checkpoint, adapters and logs).",
    )
    parser.add_argument(
        "--auth",
        action="store_true",
        help="TLS and SuperNode authentication: the SuperLink admits only the SuperNodes whose keys it registered.",
    )
    return parser


EVALUATE_DESCRIPTION = (
    "Score a model on an evaluation set: `--model RUN_DIR --party P [--round N] --eval SOURCE`, or "
    "`--model` an exported folder or a model spec [--adapter DIR] (reads only the model and SOURCE); "
    "or a party on a run's own held-out sets: `--run RUN_DIR --party P [--round N]`, `--config X [--adapter DIR]`."
)


def _evaluate_parser() -> ArgumentParser:
    parser = run_config_parser(EVALUATE_DESCRIPTION)
    _add_model_scoring_arguments(parser, with_party=False)
    parser.add_argument(
        "--run", type=Optional[str], default=None, help="The run_dir of a fedmkt run (its config and adapters)."
    )
    parser.add_argument("--party", type=str, default="server", help="server, client_0, client_1, …")
    parser.add_argument(
        "--round", type=Optional[int], default=None, help="With --run: the round's adapter (default: the last)."
    )
    parser.add_argument(
        "--adapter",
        type=Optional[str],
        default=None,
        help="LoRA adapter folder (e.g. RUN_DIR/adapters/round_2/server); with --run, from --round instead.",
    )
    return parser


def _add_model_scoring_arguments(parser: ArgumentParser, with_party: bool = True) -> None:
    """The options of `evaluate --model` (also listed in `evaluate --help`)."""
    parser.add_argument(
        "--model",
        type=Optional[str],
        default=None,
        help="What to score: a run_dir (with --party, --round), a `fedmkt export` folder, or a model spec "
        "(embedded:NAME, hub name, local folder, .gguf) with an optional --adapter.",
    )
    parser.add_argument(
        "--eval",
        type=Optional[str],
        default=None,
        help="With --model: a data source as in the configs ({path: eval.jsonl, columns: {...}}, embedded:TASK, "
        "hub:OWNER/NAME) or a task name (a run's own held-out set of it, else the data.task preset's).",
    )
    parser.add_argument(
        "--out",
        type=Optional[str],
        default=None,
        help="With --model: a JSON file for the scores and each question's result.",
    )
    parser.add_argument("--batch_size", type=int, default=16, help="With --model: questions per forward pass.")
    parser.add_argument(
        "--max_length",
        type=Optional[int],
        default=None,
        help="With --model: tokens per question (default: the run's, else 512).",
    )
    parser.add_argument(
        "--max_new_tokens", type=int, default=32, help="With --model, generation sets: most tokens generated."
    )
    parser.add_argument(
        "--eval_size",
        type=Optional[int],
        default=None,
        help=f"With --model and a task name outside a run: held-out questions (default {DataConfig.eval_size}).",
    )
    if with_party:
        parser.add_argument("--party", type=Optional[str], default=None, help="With a run_dir: server, client_0, …")
        parser.add_argument(
            "--round", type=Optional[int], default=None, help="With a run_dir: the round's adapter (default: the last)."
        )
        parser.add_argument(
            "--adapter", type=Optional[str], default=None, help="With a model spec: a LoRA adapter folder."
        )
        parser.add_argument("--seed", type=int, default=42, help="With a task name outside a run: the preset's seed.")
        parser.add_argument(
            "--cache_dir", type=Optional[str], default=None, help="Converted models (default: the fedmkt cache)."
        )


def _evaluate_model(argv: list[str]) -> None:
    """`fedmkt evaluate --model …`: parsed apart from the run config, which this form does not need."""
    parser = ArgumentParser(prog="fedmkt evaluate", description=EVALUATE_DESCRIPTION, exit_on_error=False)
    _add_model_scoring_arguments(parser)
    namespace = parser.parse_args(argv)
    if namespace.eval is None:
        raise FedMKTError(
            "--model needs the set to score it on. Fix: add --eval SOURCE (e.g. --eval arc_easy or --eval '{path: eval.jsonl}')."
        )
    from fedmkt.model_scoring import evaluation_examples, evaluation_set, load_scored_model, score_model

    wanted = evaluation_set(namespace.eval)
    scored = load_scored_model(
        namespace.model, namespace.party, namespace["round"], namespace.adapter, namespace.cache_dir
    )
    name, examples = evaluation_examples(wanted, scored.run_config, namespace.seed, namespace.eval_size)
    run = scored.run_config
    max_length = namespace.max_length or (run.data.max_length if run is not None else 512)
    scores, record = score_model(scored, examples, namespace.batch_size, max_length, namespace.max_new_tokens)
    print(" ".join(f"{key}={_plain(value)}" for key, value in scores.items()))
    if namespace.out is not None:
        import json

        from fedmkt.files import atomic_write_text

        report = {**scored.description, "eval": name, **scores, "questions": record}
        atomic_write_text(Path(namespace.out), json.dumps(report, indent=2) + "\n")


def _export_parser() -> ArgumentParser:
    parser = ArgumentParser(
        description="Write a trained party as a folder transformers (--merge) or peft loads as it is.",
        exit_on_error=False,
    )
    parser.add_argument("--run", type=str, required=True, help="The run_dir of a fedmkt run.")
    parser.add_argument("--party", type=str, required=True, help="server, client_0, client_1, …")
    parser.add_argument(
        "--out",
        type=str,
        required=True,
        help="The folder to write: new, empty, or an earlier fedmkt export (which it replaces).",
    )
    parser.add_argument("--round", type=Optional[int], default=None, help="The round's adapter (default: the last).")
    parser.add_argument(
        "--merge", action="store_true", help="Merge the adapter into the base (a plain transformers model)."
    )
    return parser


def _generate_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Print a trained party's greedy completion of a prompt.", exit_on_error=False)
    parser.add_argument("--run", type=str, required=True, help="The run_dir of a fedmkt run.")
    parser.add_argument("--party", type=str, required=True, help="server, client_0, client_1, …")
    parser.add_argument("--prompt", type=str, required=True, help="The text to complete.")
    parser.add_argument("--round", type=Optional[int], default=None, help="The round's adapter (default: the last).")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="Most tokens generated.")
    return parser


def _map_vocab_parser() -> ArgumentParser:
    parser = ArgumentParser(
        description="Precompute a MinED vocabulary map between two tokenizers.", exit_on_error=False
    )
    parser.add_argument(
        "--src", type=str, required=True, help="Source model spec: hub name, local dir, .gguf file or embedded:NAME."
    )
    parser.add_argument("--dst", type=str, required=True, help="Destination model spec (same forms as --src).")
    parser.add_argument(
        "--out", type=str, required=True, help="Output JSON: source token string -> destination token string."
    )
    parser.add_argument(
        "--cache_dir", type=Optional[str], default=None, help="Cache folder (default $FEDMKT_CACHE or ~/.cache/fedmkt)."
    )
    return parser


def _align_text_parser() -> ArgumentParser:
    parser = ArgumentParser(
        description="Show how a teacher's (--src) positions land on a receiver's (--dst) for one text.",
        exit_on_error=False,
    )
    parser.add_argument("--src", type=str, required=True, help="Teacher model spec (same forms as map-vocab).")
    parser.add_argument("--dst", type=str, required=True, help="Receiver model spec (same forms as map-vocab).")
    parser.add_argument("--text", type=str, required=True, help="The text both tokenizers encode.")
    parser.add_argument(
        "--sequence_alignment",
        dest="sequence_alignment",
        type=Literal["dtw", "offsets"],
        default="offsets",
        help="How positions are matched, as transfer.sequence_alignment: offsets or dtw.",
    )
    parser.add_argument("--json", action="store_true", help="Print a JSON list of rows instead of a table.")
    parser.add_argument(
        "--cache_dir", type=Optional[str], default=None, help="Cache folder (default $FEDMKT_CACHE or ~/.cache/fedmkt)."
    )
    return parser


def _fit(parser: ArgumentParser, namespace) -> None:
    resume, backend, overwrite = namespace.pop("resume"), namespace.pop("backend"), namespace.pop("overwrite")
    if backend is not None:
        namespace["federation.backend"] = backend
    flower = namespace["federation.backend"] == "flower"
    if resume is not None and not overwrite:  # refusals that need no model come before the heavy imports
        from fedmkt.federation.checkpoint_record import finished_line, read_checkpoint, resume_folder

        if int(read_checkpoint(resume_folder(resume))["round"]) >= namespace["federation.rounds"]:
            print(finished_line(Path(resume), namespace["federation.rounds"]))
            return
    from fedmkt.run import fit

    if flower:  # the ServerApp starts in the SuperLink's folder: run_dir must not depend on this one
        namespace.run_dir = str(Path(resume if resume is not None else namespace.run_dir).expanduser().resolve())
    config = run_config_from_namespace(parser, namespace)
    try:
        fit(config, resolved_config=parser.dump(namespace), resume=resume, overwrite=overwrite)
    except RunInterrupted as interrupt:  # on Flower the run was stopped on the SuperLink too
        if flower:
            interrupt.run_dir = namespace.run_dir
        raise


def _launch_local(parser: ArgumentParser, namespace) -> None:
    from fedmkt.federation.flower.local import launch_local

    resume, gpus, overwrite = namespace.pop("resume"), namespace.pop("gpus"), namespace.pop("overwrite")
    auth = namespace.pop("auth")
    if resume is not None and overwrite:
        raise FedMKTError("--resume and --overwrite contradict each other. Fix: give one of them.")
    namespace["federation.backend"] = "flower"
    namespace.run_dir = str(Path(resume if resume is not None else namespace.run_dir).expanduser().resolve())
    launch_local(
        run_config_from_namespace(parser, namespace),
        parser.dump(namespace),
        gpus=gpus,
        overwrite=overwrite,
        resume=resume is not None,
        auth=auth,
    )


def _evaluate(parser: ArgumentParser, namespace) -> None:
    from fedmkt.run import evaluate_party

    for option in ("model", "eval", "out", "batch_size", "max_length", "max_new_tokens", "eval_size"):
        value = namespace.pop(option)
        if option in ("model", "eval", "out", "max_length", "eval_size") and value is not None:
            raise FedMKTError(
                f"--{option} goes with --model. Fix: add --model MODEL --eval SOURCE, or drop --{option}."
            )
    run, round_index, adapter = namespace.pop("run"), namespace.pop("round"), namespace.adapter
    if run is None and round_index is not None:
        raise FedMKTError("--round picks a run's adapter. Fix: give --run RUN_DIR with it, or --adapter DIR.")
    if run is not None and adapter is not None:
        raise FedMKTError(
            "--run and --adapter both name the adapter. Fix: give --run RUN_DIR [--round N], or --adapter DIR."
        )
    if run is not None:
        from fedmkt.export import adapter_of

        _, found = adapter_of(Path(run), namespace.party, round_index)
        adapter = str(found)
    scores = evaluate_party(run_config_from_namespace(parser, namespace), namespace.party, adapter)
    print(" ".join(f"{key}={_plain(value)}" for key, value in scores.items()))


def _plain(value) -> str:
    """`0.6250`, `12`, `0.3567,0.8591` for an interval, or `0110` per-question: one token per score, for scripts to split."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return ",".join(f"{v:.4f}" for v in value)
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def _export(parser: ArgumentParser, namespace) -> None:
    from fedmkt.output_folders import check_export_target

    check_export_target(namespace.out, namespace.run)  # a refusal needs no model: before the heavy imports
    from fedmkt.export import export_party

    out, round_index = export_party(
        Path(namespace.run), namespace.party, Path(namespace.out), namespace.round, namespace.merge
    )
    loader = "AutoModelForCausalLM" if namespace.merge else "peft.AutoPeftModelForCausalLM"
    print(f"wrote {namespace.party}'s round-{round_index} model to {out} (load it with {loader}.from_pretrained)")


def _generate(parser: ArgumentParser, namespace) -> None:
    if not namespace.prompt.strip():
        raise FedMKTError("--prompt is empty. Fix: pass the text to complete, e.g. --prompt 'Question: ... Answer:'.")
    if namespace.max_new_tokens < 1:
        raise FedMKTError(f"--max_new_tokens is {namespace.max_new_tokens}. Fix: give at least 1 (default 64).")
    from fedmkt.export import generate_text

    print(
        generate_text(Path(namespace.run), namespace.party, namespace.prompt, namespace.round, namespace.max_new_tokens)
    )


def _map_vocab(parser: ArgumentParser, namespace) -> None:
    from fedmkt.alignment.vocab_map import write_vocab_map_json
    from fedmkt.config import ModelSpec
    from fedmkt.models import cache_root, load_tokenizer

    cache = namespace.cache_dir
    source = load_tokenizer(ModelSpec(namespace.src), cache, key="--src")
    target = load_tokenizer(ModelSpec(namespace.dst), cache, key="--dst")
    try:
        written = write_vocab_map_json(source, target, namespace.out, cache_dir=cache_root(cache) / "vocab_maps")
    except OSError as error:
        raise FedMKTError(
            f"cannot write --out {namespace.out} ({type(error).__name__}: {error.strerror or error}). "
            "Fix: give --out a path in a writable folder with free space."
        ) from error
    print(f"wrote {written}")


def _align_text(parser: ArgumentParser, namespace) -> None:
    import json

    from fedmkt.alignment import TokenAligner
    from fedmkt.alignment.report import alignment_rows, format_rows
    from fedmkt.config import ModelSpec
    from fedmkt.models import cache_root, load_tokenizer

    if not namespace.text:
        raise FedMKTError(
            "--text is empty. Fix: pass the text both tokenizers should encode, e.g. --text 'The quick fox'."
        )
    cache = namespace.cache_dir
    teacher, receiver = load_tokenizer(ModelSpec(namespace.src), cache), load_tokenizer(ModelSpec(namespace.dst), cache)
    aligner = TokenAligner(teacher, receiver, cache_root(cache) / "vocab_maps", namespace.sequence_alignment)
    rows = alignment_rows(aligner, namespace.text)
    print(json.dumps(rows, ensure_ascii=False) if namespace.json else format_rows(rows, namespace.text))


SUBCOMMANDS = {
    "fit": (_fit_parser, _fit, "Run FedMKT rounds end to end."),
    "launch-local": (
        _launch_local_parser,
        _launch_local,
        "Run FedMKT on a Flower SuperLink and one SuperNode per client started on this machine.",
    ),
    "evaluate": (_evaluate_parser, _evaluate, "Score a party on the held-out evaluation split."),
    "export": (_export_parser, _export, "Write a trained party as a transformers or peft model folder."),
    "generate": (_generate_parser, _generate, "Print a trained party's completion of a prompt."),
    "map-vocab": (_map_vocab_parser, _map_vocab, "Precompute a MinED vocabulary map."),
    "align-text": (
        _align_text_parser,
        _align_text,
        "Show how a teacher's positions align to a receiver's on one text.",
    ),
}
"""Subcommand → (its parser, the plain function it runs, one-line help)."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedmkt")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> tuple[ArgumentParser, dict[str, ArgumentParser]]:
    """The top-level parser and its sub-parsers by subcommand name."""
    parser = ArgumentParser(
        prog="fedmkt",
        description="FedMKT: federated mutual knowledge transfer between an LLM and SLMs.",
        exit_on_error=False,
    )
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks instead of one-line errors.")
    parser.add_argument("--version", action="version", version=f"fedmkt {_version()}")
    subcommands = parser.add_subcommands()
    sub_parsers = {}
    for name, (make_parser, _, help_text) in SUBCOMMANDS.items():
        sub_parsers[name] = make_parser()
        subcommands.add_subcommand(name, sub_parsers[name], help=help_text)
    return parser, sub_parsers


def _with_run_config(argv: list[str]) -> list[str]:
    """`fit`/`launch-local` without `--config`: a `--resume RUN_DIR` reads the run's own config.yaml;
    with neither, one line says what to pass."""
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command not in ("fit", "launch-local", "evaluate") or any(
        a == "--config" or a.startswith("--config=") for a in argv
    ):
        return argv
    if any(arg in ("-h", "--help") for arg in argv):
        return argv
    if command == "evaluate":  # `--run RUN_DIR` scores a run's party with the run's own config
        run = next((argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--run"), None)
        run = run or next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--run=")), None)
        if run is None:
            raise FedMKTError(
                "`fedmkt evaluate` needs a run or a config. Fix: pass --run RUN_DIR --party P, or --config X."
            )
        if not (Path(run) / "config.yaml").is_file():
            raise FedMKTError(f"--run {run} holds no config.yaml. Fix: pass the run_dir of a fedmkt run.")
        at = argv.index(command) + 1
        return [*argv[:at], "--config", str(Path(run) / "config.yaml"), *argv[at:]]
    resume = next((argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--resume"), None)
    resume = resume or next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--resume=")), None)
    if resume is None:
        raise FedMKTError(
            f"`fedmkt {command}` needs a config. Fix: pass --config (e.g. --config demo.yaml), or --resume RUN_DIR to continue a run."
        )
    saved = Path(resume) / "config.yaml"
    if not saved.is_file():
        raise FedMKTError(
            f"--resume {resume} holds no config.yaml to continue from. Fix: pass the run_dir of a fedmkt run, or give --config."
        )
    at = argv.index(command) + 1
    return [*argv[:at], "--config", str(saved), *argv[at:]]


def _dispatch(argv: list[str]) -> None:
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command == "evaluate" and any(a == "--model" or a.startswith("--model=") for a in argv):
        if any(a in ("--config", "--run") or a.startswith(("--config=", "--run=")) for a in argv):
            raise FedMKTError("--model names the model alone. Fix: drop --config/--run (a run folder goes in --model).")
        at = argv.index(command) + 1
        _evaluate_model(argv[at:])
        return
    parser, sub_parsers = build_parser()
    argv = expand_client_overrides(resolve_config_arguments(_with_run_config(argv)))
    if any(arg.startswith("--print_config") for arg in argv) and any(
        command in argv for command in ("fit", "launch-local", "evaluate")
    ):
        _validate_before_printing(parser, sub_parsers, argv)
    namespace = parser.parse_args(argv)
    command = namespace.subcommand
    SUBCOMMANDS[command][1](sub_parsers[command], namespace[command])


def _validate_before_printing(parser: ArgumentParser, sub_parsers: dict[str, ArgumentParser], argv: list[str]) -> None:
    """`--print_config` checks the config as a run would before printing it (a bad value is an error, not output).

    A config may be meant for other machines (GPUs, hub models, data paths that exist only there):
    what this machine cannot check is listed on stderr as checks that apply where the run
    happens, and the config is printed all the same. A value that is wrong anywhere is an error.
    """
    from fedmkt.config import check_hardware, validate
    from fedmkt.data.parts import federation_data
    from fedmkt.vocabulary_sizes import validate_against_vocabularies

    namespace = parser.parse_args([arg for arg in argv if not arg.startswith("--print_config")])
    config = run_config_from_namespace(sub_parsers[namespace.subcommand], namespace[namespace.subcommand])
    validate(config)
    elsewhere: list[str] = []
    for check in (check_hardware, lambda c: federation_data(c, list(c.parties()))):
        try:
            check(config)
        except FedMKTError as error:
            elsewhere.append(str(error).split(" Fix:")[0])
    validate_against_vocabularies(config, unreadable=elsewhere)
    for note in elsewhere:
        print(f"fedmkt: checked where the run happens, not here: {note}", file=sys.stderr)


def _interrupted_line(interrupt: RunInterrupted) -> str:
    name = signal.Signals(interrupt.signum).name
    if interrupt.run_dir is None:
        return f"fedmkt: stopped by {name}."
    run_dir = Path(interrupt.run_dir)
    if (run_dir / "checkpoint" / "checkpoint.json").is_file():
        return (
            f"fedmkt: stopped by {name}; the last round checkpoint in {run_dir} is intact. "
            f"Fix: continue with `fedmkt {interrupt.command} --config {run_dir / 'config.yaml'} --resume {run_dir}`."
        )
    return f"fedmkt: stopped by {name} before round 1 finished, so there is no checkpoint to --resume {run_dir} from. Fix: start it again with --overwrite."


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
        with stop_on_signals():
            _dispatch(argv)
    except RunInterrupted as interrupt:
        if debug:
            raise
        print(_interrupted_line(interrupt), file=sys.stderr)
        return 128 + interrupt.signum
    except FedMKTError as error:
        if debug:
            raise
        print(f"fedmkt: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # jsonargparse reports config problems as ArgumentError
        if debug or type(error).__name__ != "ArgumentError":
            raise
        problem = " ".join(str(error).split())
        command = next((arg for arg in argv if arg in SUBCOMMANDS), "fit")
        print(
            f"fedmkt: config error: {problem}. Fix: correct that key or value (see `fedmkt {command} --help`"
            + (
                ", or `--print_config` for the resolved config)."
                if command in ("fit", "launch-local", "evaluate")
                else ")."
            ),
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
