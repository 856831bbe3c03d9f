#!/usr/bin/env bash
# Quickstart on CPU: build the embedded corpus, its tokenizer and prepared shards (each only if
# missing), then pretrain configs/tiny.yaml (a 32% LowRank GPT) for a few minutes, writing
# checkpoints and TensorBoard logs under runs/tiny, and end by generating text from the trained
# model (a greedy and a sampled completion of two prompts). Extra arguments are config overrides, e.g.
#   bash scripts/quickstart.sh training.train_steps=20
# Re-running resumes the run from its latest checkpoint (remove runs/tiny to start over).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
venv="${SFFN_VENV:-$root/.venv}"
py="$venv/bin/python"
cd "$root"

context_length="$("$py" -c 'import yaml; print(yaml.safe_load(open("configs/tiny.yaml"))["model"]["seq_length"])')"

if ! compgen -G "data/corpus/*.parquet" >/dev/null; then
  echo "[quickstart] building the embedded corpus (Python and Django manuals) in data/corpus" >&2
  "$py" -m data_tools.make_corpus --out data/corpus
fi
if [ ! -f data/tokenizer.json ]; then
  echo "[quickstart] training an 8192-token BPE tokenizer: data/tokenizer.json" >&2
  "$py" -m data_tools.train_tokenizer 'data/corpus/*.parquet' --vocab-size 8192 --out data/tokenizer.json
fi
if [ ! -f data/prepared/manifest.json ]; then
  echo "[quickstart] tokenizing and packing the corpus into data/prepared (context $context_length)" >&2
  "$py" -m data_tools.prepare 'data/corpus/*.parquet' --tokenizer data/tokenizer.json --out data/prepared \
    --context-length "$context_length" --validation-fraction 0.02
fi

echo "[quickstart] training configs/tiny.yaml on CPU (checkpoints and TensorBoard logs in runs/tiny)" >&2
"$py" -m megatron_sffn.train configs/tiny.yaml "$@"

prompts=(--prompt "The os module" --prompt "To create a Django project,")
echo "[quickstart] greedy completions from runs/tiny" >&2
"$py" -m megatron_sffn.generate runs/tiny "${prompts[@]}" --max-new-tokens 32
echo "[quickstart] sampled completions (temperature 0.8, top-p 0.95, seed 1)" >&2
"$py" -m megatron_sffn.generate runs/tiny "${prompts[@]}" --max-new-tokens 32 --temperature 0.8 --top-p 0.95 --seed 1

cat >&2 <<EOF

[quickstart] done. Validation perplexity of the latest checkpoint:
  $py -m megatron_sffn.evaluate runs/tiny
More text (see README, Generation):
  $py -m megatron_sffn.generate runs/tiny --prompt "Your prompt" --max-new-tokens 64 --temperature 0.8
Training curves:
  $venv/bin/tensorboard --logdir runs/tiny/tensorboard   # then open http://localhost:6006
EOF
