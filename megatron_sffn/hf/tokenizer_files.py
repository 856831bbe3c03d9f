"""Tokenizer files between our ``tokenizer.json`` and a transformers model directory.

Export wraps our ``tokenizer.json`` in a ``PreTrainedTokenizerFast`` whose
EOS is our document separator (the token our data pipeline appends to each
document) and whose BOS is the vocabulary's begin-of-text token, or the EOS
when there is none (the GPT-2 convention: documents are separated, not
opened).  Import keeps a model's ``tokenizer.json`` byte for byte, converting
only slow (SentencePiece) tokenizers through transformers.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ..data.tokenizer import HFJsonTokenizer, load_tokenizer

TOKENIZER_JSON = "tokenizer.json"
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")


@dataclass(frozen=True)
class SpecialTokens:
    bos: str
    bos_id: int
    eos: str
    eos_id: int


def special_tokens(tokenizer: HFJsonTokenizer) -> SpecialTokens:
    """BOS and EOS of one of our tokenizers, as tokens and ids."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(tokenizer.path))
    eos = backend.id_to_token(tokenizer.eos_id)
    bos = next((t for t in BOS_CANDIDATES if backend.token_to_id(t) is not None), eos)
    return SpecialTokens(bos, backend.token_to_id(bos), eos, tokenizer.eos_id)


def require_json_tokenizer(spec: str | None, where: str) -> HFJsonTokenizer:
    """Our tokenizer named by ``spec``, which export needs to be a ``tokenizer.json``."""
    if spec is None:
        raise ValueError(f"{where}: data.tokenizer is not set; export needs the run's tokenizer.json")
    tokenizer = load_tokenizer(spec)
    if not isinstance(tokenizer, HFJsonTokenizer):
        raise ValueError(
            f"{where}: data.tokenizer={spec!r} is a tiktoken encoding; export needs a tokenizer.json "
            f"(transformers has no loader for tiktoken files without remote code)"
        )
    return tokenizer


def export_tokenizer(tokenizer: HFJsonTokenizer, out_dir: Path, *, model_max_length: int) -> SpecialTokens:
    """Write transformers' tokenizer files for ``tokenizer`` into ``out_dir``; returns its BOS/EOS."""
    from transformers import PreTrainedTokenizerFast

    special = special_tokens(tokenizer)
    fast = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer.path),
        bos_token=special.bos,
        eos_token=special.eos,
        model_max_length=model_max_length,
    )
    fast.save_pretrained(str(out_dir))
    return special


def import_tokenizer(hf_dir: Path, out_file: Path) -> HFJsonTokenizer:
    """Our ``tokenizer.json`` at ``out_file`` from the tokenizer of ``hf_dir``; checked to load."""
    source = hf_dir / TOKENIZER_JSON
    if source.is_file():
        shutil.copyfile(source, out_file)
    else:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(
                f"{hf_dir}: no {TOKENIZER_JSON} and no tokenizer transformers can load ({exc})"
            ) from exc
        if not tokenizer.is_fast:
            raise ValueError(f"{hf_dir}: the tokenizer has no fast (tokenizers) form to save as {TOKENIZER_JSON}")
        tokenizer.backend_tokenizer.save(str(out_file))
    try:
        return HFJsonTokenizer(out_file, str(out_file))
    except ValueError as exc:
        raise ValueError(f"{hf_dir}: tokenizer cannot serve as a data tokenizer: {exc}") from exc
