"""Train a byte-level BPE tokenizer (GPT-2 style) on a corpus and save ``tokenizer.json``.

    python -m data_tools.train_tokenizer data/corpus/*.parquet --vocab-size 8192 --out data/tokenizer.json

Byte-level BPE can encode any UTF-8 text without unknown tokens and decodes
back to exactly the input, which ``prepare`` and ``inspect --decode`` rely on.
``<|endoftext|>`` is the only special token; ``prepare`` appends it to every
document.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from data_tools._inputs import add_input_arguments, sources_from_args
from megatron_sffn.data.manifest import write_text_atomic
from megatron_sffn.data.text_sources import SkippedDocuments, SourceFile, iter_documents, known_document_count
from megatron_sffn.entry_setup import quiet_on_broken_pipe

EOS_TOKEN = "<|endoftext|>"


def train_tokenizer(
    sources: list[SourceFile],
    vocab_size: int,
    out: Path,
    text_key: str | None = None,
    min_frequency: int = 2,
    progress: bool = True,
    bad_documents: str = "error",
    skipped: SkippedDocuments | None = None,
) -> Path:
    """Train on every document of ``sources`` and write the tokenizer to ``out`` atomically.

    With ``bad_documents="skip"`` unreadable documents are left out and counted in ``skipped``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(
            f"--vocab-size is {vocab_size}, expected at least {len(alphabet) + 1} (256 bytes + {EOS_TOKEN})"
        )
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: decoding must give back the document exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=alphabet,
        show_progress=progress,
    )
    texts = _texts(sources, text_key, progress, bad_documents, skipped)
    first = next(texts, None)
    if first is None:
        raise ValueError(f"the corpus is empty: {', '.join(s.path for s in sources)} hold no documents")
    tokenizer.train_from_iterator(itertools.chain([first], texts), trainer=trainer)
    write_text_atomic(out, tokenizer.to_str(pretty=True))
    return out


def _texts(
    sources: list[SourceFile],
    text_key: str | None,
    progress: bool,
    bad_documents: str,
    skipped: SkippedDocuments | None,
) -> Iterator[str]:
    bar = tqdm(
        total=known_document_count(sources), unit="doc", desc="read corpus", file=sys.stderr, disable=not progress
    )
    with bar:
        for doc in iter_documents(sources, text_key, bad_documents, skipped, metadata=False):
            bar.update()
            yield doc.text


@quiet_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.train_tokenizer", description=__doc__.split("\n\n")[0])
    add_input_arguments(parser)
    parser.add_argument("--vocab-size", type=int, default=8192, help="final vocabulary size, including <|endoftext|>")
    parser.add_argument("--min-frequency", type=int, default=2, help="pairs seen fewer times are not merged")
    parser.add_argument("--out", required=True, type=Path, help="where to write tokenizer.json")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    skipped = SkippedDocuments()
    try:
        path = train_tokenizer(
            sources_from_args(args),
            args.vocab_size,
            args.out,
            args.text_key,
            args.min_frequency,
            progress=not args.quiet,
            bad_documents=args.bad_documents,
            skipped=skipped,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"train-tokenizer: error: {exc}", file=sys.stderr)
        return 1
    if skipped.count:
        print(f"train-tokenizer: {skipped.summary()}", file=sys.stderr)
    print(f"train-tokenizer: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
