#!/usr/bin/env bash
# Regenerate docs/language-generation.md and docs/language-generation.png: the README
# walk-through's no-python mask (its corpus, `monet masks build language` with its defaults),
# then `monet masks eval` with the generation-level effects on the corpus's held-out texts.
# About an hour on 2 shared cores (the learned build is most of it); outputs under runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
MONET=(${MONET:-.venv/bin/monet})
MODEL=monet_runtime/default_model
SAMPLES=${SAMPLES:-5} PROMPTS=${PROMPTS:-10} TOKENS=${TOKENS:-64}  # monet masks eval's defaults
[ -f runs/corpus/train.jsonl ] || "${MONET[@]}" corpus build runs/corpus --max-chars 150000 >/dev/null
[ -f runs/no-python.json ] || "${MONET[@]}" masks build language runs/corpus/train.jsonl \
    --model "$MODEL" --target python --name no-python --out runs/no-python.json
"${MONET[@]}" masks eval runs/no-python.json runs/corpus/test.jsonl --model "$MODEL" \
    --samples "$SAMPLES" --prompts "$PROMPTS" --max-new-tokens "$TOKENS" \
    --png docs/language-generation.png --markdown runs/no-python-eval.md
{
    echo "# What the walk-through's no-python mask does to generations"
    echo
    echo "The README walk-through's mask (\`monet masks build language\` with its defaults: the"
    echo "learned criterion) on the shipped model: held-out prompts of each language (pieces of"
    echo "the test split of \`monet corpus build runs/corpus --max-chars 150000\`) continued"
    echo "$SAMPLES times each with and without the mask; each continuation's language named by a"
    echo "character n-gram classifier trained on the training split. The target: Python's share"
    echo "falls to at most a fifth of its unmasked rate while every other language keeps at least"
    echo "80% of its own (\"kept\"). Regenerate with \`scripts/language_generation.sh\`."
    echo
    sed 's/^## /### /' runs/no-python-eval.md
    echo
    echo "![generation](language-generation.png)"
} > docs/language-generation.md
echo "docs/language-generation.md"
