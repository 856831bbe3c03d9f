"""Command-line options for naming a corpus, shared by every tool that reads one."""

from __future__ import annotations

import argparse

from megatron_sffn.data.text_sources import BAD_DOCUMENT_MODES, SourceFile, expand_inputs


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="+",
        help="corpus files, directories or globs: RefinedWeb-format .parquet, .jsonl/.ndjson, "
        "or plain text (one document per file)",
    )
    parser.add_argument(
        "--text-key",
        default=None,
        help="parquet column / JSONL key holding the text (default: 'content' for parquet, 'text' for JSONL)",
    )
    parser.add_argument(
        "--input-format",
        choices=("parquet", "jsonl", "text"),
        default=None,
        help="read every input as this format instead of guessing from the file name",
    )
    parser.add_argument(
        "--bad-documents",
        choices=BAD_DOCUMENT_MODES,
        default="error",
        help="a document that cannot be read (invalid UTF-8, a lone surrogate, a null or broken row): "
        "stop with an error naming file and row (default), or skip it and count it in the summary",
    )


def sources_from_args(args: argparse.Namespace) -> list[SourceFile]:
    return expand_inputs(args.inputs, args.input_format)
