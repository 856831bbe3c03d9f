"""Batched decoding with megatron-core's KV cache (``StaticInferenceContext``) through ``GPTModel.forward``.

Prompts of different lengths are handled the way megatron's own static
batching does it, which keeps every position exact and puts no padding into
any attention state: the whole batch is prefilled up to the shortest prompt,
then advances one position per step; a row whose prompt is not yet consumed
is fed its next prompt token instead of the sampled one.  Every forward goes
through ``GPTModel.forward(..., inference_context=context)`` followed by
megatron's offset bookkeeping (``increment_sequence_len_offset``; decode mode
once every prompt is consumed), so any attention module that honours
megatron's inference-context protocol (a KV cache, or a recurrent state kept
in the context) works here unchanged.  It is exact for a recurrent state
too: at every position each row is fed exactly one token, its own (prompt or
sampled), in order, so a row's state only ever absorbs its own real tokens.

Causal alignment: megatron turns the mask type to ``no_mask`` once the cache
holds tokens.  A single new token may see the whole cache, but a prefill
chunk of several tokens over an existing cache needs the bottom-right
aligned causal mask (query i sees keys up to offset + i), which is passed
explicitly, exactly as megatron's static engine slices its causal mask.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .sampling import SamplingParams, choose_next

# (row, token id, whether the row is finished) of every token generated in one step, in row order.
StepCallback = Callable[[list[tuple[int, int, bool]]], None]


@dataclass
class Completion:
    """What one prompt produced: the generated ids (the EOS included when one ended it)."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "eos" or "length"
    logits: list[torch.Tensor] | None = None  # per generated token, fp32 (vocab,), when requested


@dataclass
class GenerationOutput:
    """Completions and timings.  Prefill counts the tokens of the batched prefill (batch x shortest
    prompt); every later forward is a one-token step, and decode tokens/s counts the tokens generated."""

    completions: list[Completion]
    prefill_tokens: int
    prefill_seconds: float
    decode_tokens: int
    decode_seconds: float
    # Bytes of the attention state held in the inference context at the end on this rank: KV caches
    # (sized to prompt + new tokens) and SUPRA recurrent states (batch x heads x d_k x d_v, any length).
    state_bytes: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


def check_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, context_length: int) -> None:
    """Refuse what the model cannot continue: empty prompts, or prompt + new tokens beyond the context."""
    if not prompts:
        raise ValueError("no prompts given")
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty (no tokens)")
        if len(prompt) > context_length:
            raise ValueError(
                f"prompt {index} has {len(prompt)} tokens, longer than the model's context of {context_length}"
            )
        if len(prompt) + max_new_tokens > context_length:
            raise ValueError(
                f"prompt {index}: {len(prompt)} tokens + max_new_tokens={max_new_tokens} = "
                f"{len(prompt) + max_new_tokens} exceeds the model's context of {context_length}"
            )


def causal_chunk_mask(offset: int, length: int, device: torch.device | None = None) -> torch.Tensor | None:
    """megatron's mask (True = masked) of ``length`` queries at positions ``offset...`` over the cache, or None.

    None where the attention's own alignment is already right: the first
    chunk (megatron's causal mask type) and a single token (sees everything).
    """
    if offset == 0 or length == 1:
        return None
    query = torch.arange(offset, offset + length, device=device).unsqueeze(1)
    key = torch.arange(offset + length, device=device).unsqueeze(0)
    return (key > query).view(1, 1, length, offset + length)


def context_state_bytes(context) -> int:
    """Bytes of every tensor in the context's per-layer memory (a KV-cache pair or a recurrent state)."""
    total = 0
    for memory in context.key_value_memory_dict.values():
        for tensor in memory if isinstance(memory, (tuple, list)) else (memory,):
            total += tensor.numel() * tensor.element_size()
    return total


class Decoder:
    """Generates from token ids with a GPTModel of this rank (one pipeline stage: PP=1).

    Collective over the tensor-parallel group: every rank calls
    :meth:`generate` with the same arguments.  Sampled tokens are broadcast
    from the group's first rank, so all ranks continue identically.
    ``vocab_limit`` masks logits of ids the tokenizer cannot decode (a model
    vocabulary padded beyond the tokenizer's).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        eos_id: int | None,
        context_length: int,
        vocab_limit: int | None = None,
        prefill_chunk: int | None = None,
    ) -> None:
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk} must be at least 1 (or None: one chunk)")
        self.model = model
        self.eos_id = eos_id
        self.context_length = context_length
        self.vocab_limit = vocab_limit
        self.prefill_chunk = prefill_chunk

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        on_step: StepCallback | None = None,
        keep_logits: bool = False,
    ) -> GenerationOutput:
        from megatron.core.inference.contexts import StaticInferenceContext

        check_prompts(prompts, params.max_new_tokens, self.context_length)
        self.model.eval()
        device = _model_device(self.model)
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        total = int(lengths.max()) + params.max_new_tokens
        tokens = torch.zeros(len(prompts), total, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
        context = StaticInferenceContext(max_batch_size=len(prompts), max_sequence_length=total)
        generator = torch.Generator(device=device).manual_seed(params.seed)
        completions = [Completion(logits=[] if keep_logits else None) for _ in prompts]
        shortest, longest = int(lengths.min()), int(lengths.max())

        started = _now(device)
        chunk = self.prefill_chunk or shortest
        for start in range(0, shortest, chunk):
            logits = self._forward(tokens[:, start : min(start + chunk, shortest)], context)
        prefill_seconds = _now(device) - started

        started = _now(device)
        done = [False] * len(prompts)
        for position in range(shortest, total):
            chosen = self._choose(logits, params, generator)
            in_prompt = position < lengths
            tokens[:, position] = torch.where(in_prompt, tokens[:, position], chosen)
            emitted = []
            for row, completion in enumerate(completions):
                if in_prompt[row] or done[row]:
                    continue
                token = int(chosen[row])
                completion.token_ids.append(token)
                if keep_logits:
                    completion.logits.append(logits[row].clone())
                if token == self.eos_id:
                    done[row], completion.finish_reason = True, "eos"
                elif len(completion.token_ids) == params.max_new_tokens:
                    done[row] = True
                emitted.append((row, token, done[row]))
            if on_step is not None and emitted:
                on_step(emitted)
            if all(done):
                break
            if position >= longest:
                context.enable_decode_mode()
            logits = self._forward(tokens[:, position : position + 1], context)
        decode_seconds = _now(device) - started
        return GenerationOutput(
            completions=completions,
            prefill_tokens=len(prompts) * shortest,
            prefill_seconds=prefill_seconds,
            decode_tokens=sum(len(c.token_ids) for c in completions),
            decode_seconds=decode_seconds,
            state_bytes=context_state_bytes(context),
        )

    def _forward(self, chunk: torch.Tensor, context) -> torch.Tensor:
        """One ``GPTModel.forward`` over ``chunk`` (batch, n) at the context's offset; last-position logits."""
        offset, length = context.sequence_len_offset, chunk.shape[1]
        positions = torch.arange(offset, offset + length, device=chunk.device).expand_as(chunk)
        mask = causal_chunk_mask(offset, length, chunk.device)
        logits = self.model(chunk, positions, mask, inference_context=context, runtime_gather_output=True)
        context.increment_sequence_len_offset(length)
        logits = logits[:, -1, :].float()
        if self.vocab_limit is not None and self.vocab_limit < logits.shape[-1]:
            logits[:, self.vocab_limit :] = float("-inf")
        return logits

    def _choose(self, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
        """The next token of every row, identical on every tensor-parallel rank."""
        import torch.distributed as dist
        from megatron.core import parallel_state

        chosen = choose_next(logits, params, generator)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            dist.broadcast(
                chosen,
                parallel_state.get_tensor_model_parallel_src_rank(),
                group=parallel_state.get_tensor_model_parallel_group(),
            )
        return chosen


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
