"""From a run directory to a model ready to generate: checkpoint, run config, tokenizer, layout.

:func:`plan_generation` does everything that can fail on user input without
touching the model (which checkpoint, its config, the tokenizer, the
requested layout), so bad input is refused in a second rather than after
megatron's set-up.  :meth:`TextGenerator.load` then builds this rank's model
at the requested tensor-parallel size, loads the weights (saved at any
TP/PP layout) and sets up pre-merge; the generator is loaded once and
generates many times.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..config.loading import load_config
from ..config.train import TrainConfig
from ..data.tokenizer import Tokenizer, load_tokenizer
from .engine import Decoder, GenerationOutput, StepCallback, check_prompts
from .premerge import PreMergeMode, PreMergeReport, apply_pre_merge
from .sampling import SamplingParams


@dataclass(frozen=True)
class GenerationPlan:
    """What a generation run will load, checked before anything is built."""

    checkpoint: Path
    config: TrainConfig
    tokenizer: Tokenizer
    tensor_parallel: int

    @property
    def context_length(self) -> int:
        return self.config.model.seq_length

    def encode(self, prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
        """Token ids of ``prompts``, refused (naming the prompt) when the model cannot continue them."""
        for index, text in enumerate(prompts):
            if not text:
                raise ValueError(f"prompt {index} is empty")
        ids = self.tokenizer.encode_batch(list(prompts))
        check_prompts(ids, max_new_tokens, self.context_length)
        return ids


def plan_generation(
    run_dir: str | Path,
    *,
    step: int | None = None,
    tokenizer: str | None = None,
    tensor_parallel: int | None = None,
    pipeline_parallel: int = 1,
    world_size: int | None = None,
) -> GenerationPlan:
    """Check a generation request against the run (cheap; no model, no process groups)."""
    from ..planning.checks import check_run_config
    from ..training.checkpointing import CONFIG_FILE, resolve_step_checkpoint

    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if pipeline_parallel != 1:
        raise ValueError(
            f"pipeline_parallel={pipeline_parallel}: generation runs the whole model on each rank (PP=1); "
            "a checkpoint saved with pipeline parallelism loads at PP=1"
        )
    tp = world if tensor_parallel is None else tensor_parallel
    if tp < 1 or world % tp:
        raise ValueError(f"tensor_parallel={tp} must be >= 1 and divide the world size {world}")
    checkpoint = resolve_step_checkpoint(run_dir, step)
    overrides = [f"parallel.tensor_parallel={tp}", "parallel.pipeline_parallel=1"]
    names_data = _names_data(checkpoint / CONFIG_FILE)
    if not names_data:
        overrides.append(f"data.path={NO_DATA}")
    config = load_config(TrainConfig, checkpoint / CONFIG_FILE, overrides)
    check_run_config(config)  # the TP split of its structured FFN, before any process group
    spec = tokenizer or config.data.tokenizer
    if spec is None and not names_data:
        raise ValueError(f"{checkpoint}: the run names no tokenizer (data.tokenizer) nor data; pass --tokenizer")
    return GenerationPlan(checkpoint, config, _tokenizer(config, tokenizer, checkpoint), tp)


# Generation reads no data: a run config without data.path (an import_hf run directory) gets this
# placeholder only so that it validates as a TrainConfig.
NO_DATA = "(no data needed for generation)"


def _names_data(config_file: Path) -> bool:
    """Whether the run config names its data (``data.path`` or ``data.raw``)."""
    import yaml

    data = (yaml.safe_load(config_file.read_text()) or {}).get("data") or {}
    return data.get("path") is not None or data.get("raw") is not None


def _tokenizer(config: TrainConfig, override: str | None, checkpoint: Path) -> Tokenizer:
    """The run's tokenizer: given, else the run config's, else the one its prepared dataset recorded."""
    spec = override or config.data.tokenizer
    if spec is None and config.data.path is not None:
        from ..data.manifest import load_manifest

        spec = load_manifest(config.data.path).tokenizer.spec
    if spec is None:
        raise ValueError(f"{checkpoint}: the run names no tokenizer (data.tokenizer); pass one explicitly")
    try:
        tokenizer = load_tokenizer(spec)
    except FileNotFoundError as err:
        if override is not None:
            raise
        raise FileNotFoundError(f"{checkpoint}: the run's tokenizer: {err}; give another (--tokenizer)") from err
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(
            f"tokenizer {spec!r} has {tokenizer.vocab_size} tokens, more than the model's "
            f"vocab_size={config.model.vocab_size}"
        )
    return tokenizer


@dataclass
class TextCompletion:
    text: str
    token_ids: list[int]
    finish_reason: str


class TextGenerator:
    """A loaded model that turns prompts into completions; collective over its tensor-parallel group."""

    def __init__(self, plan: GenerationPlan, model, pre_merge: PreMergeReport, prefill_chunk: int | None) -> None:
        self.plan, self.model, self.pre_merge = plan, model, pre_merge
        self.decoder = Decoder(
            model,
            eos_id=plan.tokenizer.eos_id,
            context_length=plan.context_length,
            vocab_limit=plan.tokenizer.vocab_size,
            prefill_chunk=prefill_chunk,
        )

    @classmethod
    def load(
        cls, plan: GenerationPlan, *, pre_merge: PreMergeMode = "auto", prefill_chunk: int | None = None
    ) -> "TextGenerator":
        """Collective: set up process groups at the plan's layout, build, load and pre-merge the model."""
        model = load_model(plan)
        return cls(plan, model, apply_pre_merge(model, pre_merge), prefill_chunk)

    def generate(
        self, prompts: Sequence[str], params: SamplingParams, *, on_step: StepCallback | None = None
    ) -> tuple[list[TextCompletion], GenerationOutput]:
        """Completions of ``prompts`` (text without the EOS that ended it) and the run's timings."""
        output = self.decoder.generate(self.plan.encode(prompts, params.max_new_tokens), params, on_step=on_step)
        completions = [
            TextCompletion(self.decode(c.token_ids), c.token_ids, c.finish_reason) for c in output.completions
        ]
        return completions, output

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of generated ids; an EOS ends the text and is not part of it."""
        eos = self.plan.tokenizer.eos_id
        ids = list(token_ids)
        return self.plan.tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids)


def load_model(plan: GenerationPlan):
    """Collective: this rank's model of ``plan.checkpoint`` at the plan's tensor-parallel size, in eval mode."""
    import torch

    from .. import cpu_compat
    from ..model import seed_model_parallel
    from ..training.checkpointing import load_checkpoint
    from ..training.loop import init_distributed
    from ..training.model_setup import Numerics, build_model

    on_gpu = torch.cuda.is_available()
    cpu_compat.enable_if_no_cuda()
    init_distributed(plan.config, on_gpu)
    seed_model_parallel(plan.config.training.seed)
    model = build_model(plan.config, Numerics.resolve(plan.config, on_gpu))
    load_checkpoint(plan.checkpoint, model=[model])
    model.eval()
    return model
