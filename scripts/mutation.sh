#!/usr/bin/env bash
# Mutation testing (mutmut) of the code where a silent error costs users most: the one-token decoding step and the
# cache plumbing of modeling_char_lstm.py, the tokenizer's character lookups, and the stateful streams saved with the
# checkpoints in training/stateful.py. Not part of .ci/run: about 30 minutes on 2 idle cores. See docs/mutation.md.
#
#   scripts/mutation.sh                 # the whole scope below; results in $MUTATION_DIR (default /tmp/char_lstm_mutation)
#   scripts/mutation.sh 'char_lstm.modeling_char_lstm.x__single_step*'   # some mutants only (mutmut's name globs)
#
# It runs in a copy of src/ and tests/ (mutmut rewrites the sources it mutates), in-process tests only: the tests
# that run scripts in subprocesses would import the unmutated package.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${MUTATION_DIR:-/tmp/char_lstm_mutation}
mkdir -p "$work"
rm -rf "$work/src" "$work/tests"
cp -r "$root/src" "$root/tests" "$work/"
cat > "$work/pyproject.toml" <<'TOML'
[tool.mutmut]
source_paths = ["src"]
only_mutate = ["src/char_lstm/modeling_char_lstm.py", "src/char_lstm/tokenization_char_lstm.py", "src/char_lstm/training/stateful.py"]
pytest_add_cli_args_test_selection = [
    "tests/test_modeling_char_lstm.py", "tests/test_generation_char_lstm.py", "tests/test_tokenization_char_lstm.py",
    "tests/test_training.py::test_stateful_trainer_carries_the_state_and_resets_it_where_streams_start",
    "tests/test_training.py::test_stateful_resume_continues_the_streams_exactly",
    "tests/test_training.py::test_stateful_evaluation_leaves_the_training_streams_alone",
]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "no:timeout", "-W", "ignore"]
process_isolation = "forkserver"
TOML
# The scope: mutmut's mutant names, "x_FUNCTION" or "xǁCLASSǁMETHOD" in each module.
scope=(
    'char_lstm.modeling_char_lstm.x__step_weights__mutmut_*' 'char_lstm.modeling_char_lstm.x__single_step__mutmut_*'
    'char_lstm.modeling_char_lstm.x__read_state__mutmut_*' 'char_lstm.modeling_char_lstm.x__write_state__mutmut_*'
    'char_lstm.modeling_char_lstm.x_detach_cache__mutmut_*' 'char_lstm.modeling_char_lstm.x_reset_cache_rows__mutmut_*'
    'char_lstm.modeling_char_lstm.x_cache_states__mutmut_*' 'char_lstm.modeling_char_lstm.x_cache_from_states__mutmut_*'
    'char_lstm.tokenization_char_lstm.xǁCharLSTMTokenizerǁoov_characters__mutmut_*'
    'char_lstm.tokenization_char_lstm.xǁCharLSTMTokenizerǁ_lookup_table__mutmut_*'
    'char_lstm.tokenization_char_lstm.xǁCharLSTMTokenizerǁencode_corpus__mutmut_*'
    'char_lstm.training.xǁStatefulTrainerǁcompute_loss__mutmut_*'
    'char_lstm.training.xǁStatefulTrainerǁ_save_rng_state__mutmut_*'
    'char_lstm.training.xǁStatefulTrainerǁ_load_rng_state__mutmut_*'
)
if [ $# -gt 0 ]; then scope=("$@"); fi
cd "$work"
unset PYTHONPATH  # mutmut puts mutants/src first; the real src must not be importable
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
nice -n 10 mutmut run --max-children "${MUTATION_JOBS:-2}" "${scope[@]}" || true
mutmut results --all true > results.txt 2>/dev/null || mutmut results > results.txt
python - "${scope[@]}" <<'PY'
import fnmatch, re, sys
lines = [l.strip() for l in open("results.txt") if ": " in l]
results = [l.rsplit(": ", 1) for l in lines]
scoped = [(n, s) for n, s in results if any(fnmatch.fnmatchcase(n, p) for p in sys.argv[1:])]
for module in ("modeling_char_lstm", "tokenization_char_lstm", "training"):
    mine = [s for n, s in scoped if n.startswith(f"char_lstm.{module}.")]
    killed = sum(s in ("killed", "timeout") for s in mine)
    checked = sum(s in ("killed", "timeout", "survived") for s in mine)
    print(f"{module}: {killed}/{checked} killed ({100 * killed / max(checked, 1):.0f}%), {len(mine) - checked} not run")
print("survivors:")
for n, s in scoped:
    if s == "survived":
        print("  ", n)
PY
