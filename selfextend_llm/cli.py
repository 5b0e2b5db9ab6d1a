"""``selfextend-llm``: inspect the extended window and ask questions about whole files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load(args: argparse.Namespace):
    import selfextend_llm

    return selfextend_llm.load(
        args.model,
        gguf_file=args.gguf_file,
        target_context=args.target_context,
        group_size=args.group_size,
        neighbor_window=args.neighbor_window,
        device=args.device,
    )


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
    if not path.is_file():
        print(f"error: no such file: {path}", file=sys.stderr)
        return 2
    model = _load(args)
    text = path.read_text(encoding="utf-8", errors="replace")
    question = " ".join(args.question) or "Summarise this document."
    messages = [
        {"role": "system", "content": "Answer the question using the document."},
        {"role": "user", "content": f"{text}\n\n{question}"},
    ]
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
