"""Text generation from trained checkpoints: KV-cached decoding at any TP size, and pre-merge.

    from megatron_sffn.inference import SamplingParams, TextGenerator, plan_generation

    plan = plan_generation("runs/tiny")              # checks the request; loads nothing heavy
    generator = TextGenerator.load(plan, pre_merge="auto")
    completions, stats = generator.generate(["def main():"], SamplingParams(max_new_tokens=32))

:class:`Decoder` works on token ids with any GPTModel; :func:`apply_pre_merge`
sets up the dense shards of the structured linears.
"""

from .engine import Completion, Decoder, GenerationOutput, causal_chunk_mask, check_prompts
from .loading import GenerationPlan, TextCompletion, TextGenerator, load_model, plan_generation
from .premerge import PRE_MERGE_MODES, PreMergeReport, apply_pre_merge, calibrate, structured_linears
from .sampling import SamplingParams, choose_next

__all__ = [
    "Completion",
    "Decoder",
    "GenerationOutput",
    "GenerationPlan",
    "PRE_MERGE_MODES",
    "PreMergeReport",
    "SamplingParams",
    "TextCompletion",
    "TextGenerator",
    "apply_pre_merge",
    "calibrate",
    "causal_chunk_mask",
    "check_prompts",
    "choose_next",
    "load_model",
    "plan_generation",
    "structured_linears",
]
