"""Generate text from a trained run, with a KV cache, at any tensor-parallel size.

    python -m megatron_sffn.generate runs/tiny --prompt "The os module" --max-new-tokens 40
    python -m megatron_sffn.generate runs/tiny --prompt-file prompts.txt --max-new-tokens 64 \\
        --temperature 0.8 --top-p 0.95 --seed 1 --json
    torchrun --nproc_per_node 2 -m megatron_sffn.generate runs/tiny --prompt "Django" --max-new-tokens 32

Every rank of the launch is one tensor-parallel rank (``--tensor-parallel``
defaults to the world size).  The checkpoint may have been saved at any
TP/PP layout.  A prompt file holds one prompt per line (blank lines are
refused).  Without ``--json`` completions stream to the console as they are
produced, prompt after prompt; with ``--json`` one JSON object is printed:
per prompt the completion ``text`` and its generated ``token_ids``, plus the
measured prefill and decode tokens/s.  ``--pre-merge`` chooses how
structured FFN linears run (see ``megatron_sffn.inference.premerge``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Sequence, TextIO

from .entry_setup import quiet_known_warnings, quiet_on_broken_pipe
from .inference.loading import GenerationPlan, TextGenerator, plan_generation
from .inference.premerge import PRE_MERGE_MODES
from .inference.sampling import SamplingParams


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_sffn.generate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("run_dir", help="a run directory (its latest checkpoint) or a checkpoint directory")
    parser.add_argument("--step", type=int, help="the checkpoint of this step instead of the latest")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    prompts.add_argument("--prompt-file", type=Path, help="a UTF-8 file with one prompt per line")
    parser.add_argument("--max-new-tokens", type=int, required=True, help="tokens to generate per prompt at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    parser.add_argument(
        "--pre-merge",
        choices=PRE_MERGE_MODES,
        default="auto",
        help="structured FFNs: merged dense shards for small calls (auto), always (on), never (off)",
    )
    parser.add_argument("--tokenizer", help="tokenizer.json or tiktoken name (default: the run's)")
    parser.add_argument("--tensor-parallel", type=int, help="tensor-parallel size (default: the world size)")
    parser.add_argument("--pipeline-parallel", type=int, default=1, help="only 1 is supported")
    parser.add_argument("--prefill-chunk", type=int, help="prefill prompts in chunks of this many tokens")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    return parser.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return list(args.prompt)
    path: Path = args.prompt_file
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise ValueError(f"{path}: line {number} is blank (one prompt per line)")
    if not lines:
        raise ValueError(f"{path}: no prompts")
    return lines


def prepare(args: argparse.Namespace) -> tuple[GenerationPlan, list[str], SamplingParams]:
    """Every check on the request, before the model is built."""
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise ValueError(f"--prefill-chunk={args.prefill_chunk} must be at least 1")
    prompts = read_prompts(args)
    plan = plan_generation(
        args.run_dir,
        step=args.step,
        tokenizer=args.tokenizer,
        tensor_parallel=args.tensor_parallel,
        pipeline_parallel=args.pipeline_parallel,
    )
    plan.encode(prompts, params.max_new_tokens)
    return plan, prompts, params


class StreamPrinter:
    """Prints completions as they grow, one prompt after another.

    All prompts advance together, so only one can be shown live: the first
    unfinished one.  The others' text is held until their turn and then
    printed at once.  Text is decoded from all ids so far (a token may end
    in the middle of a character), and a trailing replacement character is
    held back until the next token completes it.
    """

    def __init__(self, generator: TextGenerator, prompts: Sequence[str], out: TextIO) -> None:
        self.generator, self.prompts, self.out = generator, list(prompts), out
        self.ids: list[list[int]] = [[] for _ in prompts]
        self.shown = [0] * len(prompts)
        self.finished = [False] * len(prompts)
        self.current = -1
        self._advance()

    def on_step(self, emitted: list[tuple[int, int, bool]]) -> None:
        for row, token, finished in emitted:
            self.ids[row].append(token)
            self.finished[row] = finished
        self._flush(self.current)
        self._advance()

    def _flush(self, row: int, final: bool = False) -> None:
        text = self.generator.decode(self.ids[row])
        if not final and text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        if len(text) > self.shown[row]:
            self.out.write(text[self.shown[row] :])
            self.shown[row] = len(text)
            self.out.flush()

    def _advance(self) -> None:
        while self.current < len(self.prompts) and (self.current < 0 or self.finished[self.current]):
            if self.current >= 0:
                self._flush(self.current, final=True)
                self.out.write("\n")
            self.current += 1
            if self.current < len(self.prompts):
                self.out.write(f"--- [{self.current}] {self.prompts[self.current]}")
                self._flush(self.current)

    def close(self) -> None:
        """Show whatever is left (rows cut short by the context end)."""
        while self.current < len(self.prompts):
            self.finished[self.current] = True
            self._advance()


@quiet_on_broken_pipe
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_known_warnings()
    try:
        plan, prompts, params = prepare(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2

    import torch.distributed as dist

    if os.environ.get("RANK", "0") == "0" and not args.json:
        print(
            f"[generate] loading {plan.checkpoint} at tensor_parallel={plan.tensor_parallel}",
            file=sys.stderr,
            flush=True,
        )
    try:
        generator = TextGenerator.load(plan, pre_merge=args.pre_merge, prefill_chunk=args.prefill_chunk)
        rank0 = dist.get_rank() == 0
        if rank0 and not args.json:
            _report_setup(generator)
        printer = StreamPrinter(generator, prompts, sys.stdout) if rank0 and not args.json else None
        completions, output = generator.generate(prompts, params, on_step=printer.on_step if printer else None)
        if printer is not None:
            printer.close()
            print(
                f"[generate] prefill {output.prefill_tokens_per_s:,.0f} tokens/s, "
                f"decode {output.decode_tokens_per_s:,.1f} tokens/s",
                file=sys.stderr,
                flush=True,
            )
        if rank0 and args.json:
            print(json.dumps(_json_report(generator, prompts, completions, output, params)), flush=True)
    finally:
        from .model.distributed import close_process_group

        close_process_group()
    return 0


def _report_setup(generator: TextGenerator) -> None:
    from .parallel.premerge import ALWAYS

    merge = generator.pre_merge
    if merge.mode == "off" or not merge.extra_bytes:
        return
    line = f"[generate] pre-merge {merge.mode}: +{merge.extra_bytes / 2**20:.1f} MiB per rank"
    if merge.mode == "auto":
        limits = ", ".join(
            f"{key.split('|')[1]} {'always' if tokens == ALWAYS else f'<= {tokens} tokens'}"
            for key, tokens in merge.thresholds.items()
        )
        line += f"; merged shards used for {limits}"
        if merge.calibrated:
            line += f" (calibrated now in {merge.calibration_seconds:.1f} s, cached)"
    print(line, file=sys.stderr, flush=True)


def _json_report(generator, prompts, completions, output, params: SamplingParams) -> dict:
    from .parallel.premerge import ALWAYS

    merge = generator.pre_merge
    return {
        "checkpoint": str(generator.plan.checkpoint),
        "tensor_parallel": generator.plan.tensor_parallel,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "sampling": dataclasses.asdict(params),
        "completions": [
            {"prompt": p, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
            for p, c in zip(prompts, completions, strict=True)
        ],
        "prefill_tokens": output.prefill_tokens,
        "prefill_tokens_per_s": output.prefill_tokens_per_s,
        "decode_tokens": output.decode_tokens,
        "decode_tokens_per_s": output.decode_tokens_per_s,
        "pre_merge": {
            "mode": merge.mode,
            "extra_bytes_per_rank": merge.extra_bytes,
            "thresholds": {k: ("always" if v == ALWAYS else v) for k, v in merge.thresholds.items()},
        },
    }


if __name__ == "__main__":
    sys.exit(main())
