#!/usr/bin/env bash
# Mutation testing (mutmut 3) of the code where a silent error costs users most, in three scopes, each with the
# in-process tests that exercise it (a mutant runs only the tests that reached its function in a first clean run):
#   modeling   the one-token decoding step (step_char_lstm.py) and the cache plumbing (cache_char_lstm.py)
#   tokenizer  the character <-> id lookups, special and added tokens, encode_corpus / oov_characters
#   training   the stateful streams (training/stateful.py) and the checkpoints (training/checkpoints.py): staging,
#              publishing, completeness, resume
# Not part of .ci/run (about an hour on 2 cores for the three). See docs/mutation.md for the results.
#
#   scripts/mutation.sh                        # the three scopes; results in $MUTATION_DIR/<scope> (default /tmp/char_lstm_mutation)
#   scripts/mutation.sh tokenizer              # one scope
#   scripts/mutation.sh modeling 'char_lstm.step_char_lstm.x__single_step__mutmut_1*'   # some mutants (names, globs)
#   MUTATION_JOBS=1 MUTATION_DIR=/tmp/m scripts/mutation.sh training
#
# Each scope runs in its own copy of src/ and tests/ (mutmut rewrites the sources it mutates), with in-process tests
# only: tests that run scripts in subprocesses would import the unmutated package. `cd $MUTATION_DIR/<scope> &&
# mutmut show NAME` shows one mutant.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
base=${MUTATION_DIR:-/tmp/char_lstm_mutation}
m=char_lstm.step_char_lstm
k=char_lstm.cache_char_lstm
t=char_lstm.tokenization_char_lstm
c=char_lstm.training.checkpoints
e=char_lstm.training.resuming
r=char_lstm.training.stateful

# The scopes: the module mutated, the tests, and mutmut's mutant names ("x_FUNCTION" or "xǁCLASSǁMETHOD").
scope_modeling() {
    modules='"src/char_lstm/step_char_lstm.py", "src/char_lstm/cells_char_lstm.py", "src/char_lstm/cache_char_lstm.py"'
    tests=('"tests/test_step_char_lstm.py"' '"tests/test_cache_char_lstm.py"' '"tests/test_modeling_char_lstm.py"'
           '"tests/test_generation_char_lstm.py"'
           '"tests/test_stateful.py::test_stateful_trainer_carries_the_state_and_resets_it_where_streams_start"')
    names=("$m.x__step_weights__mutmut_*" "$m.x__single_step__mutmut_*" "$k.x__read_state__mutmut_*"
           "$k.x__write_state__mutmut_*" "$k.x_detach_cache__mutmut_*" "$k.x_reset_cache_rows__mutmut_*"
           "$k.x_cache_states__mutmut_*" "$k.x_cache_from_states__mutmut_*")
}
scope_tokenizer() {
    modules='"src/char_lstm/tokenization_char_lstm.py"'
    # the test that loads a saved tokenizer in a process without the package reads files only: left out (5 s)
    tests=('"tests/test_tokenization_char_lstm.py"'
           '"--deselect=tests/test_tokenization_char_lstm.py::test_auto_tokenizer_without_remote_code_in_a_process_without_the_package"')
    names=("$t.x__backend__mutmut_*" "$t.x__template_adds__mutmut_*" "$t.x__read_vocab_file__mutmut_*"
           "$t.xǁCharLSTMTokenizerǁ__init____mutmut_*" "$t.xǁCharLSTMTokenizerǁfrom_corpus__mutmut_*"
           "$t.xǁCharLSTMTokenizerǁ_characters__mutmut_*" "$t.xǁCharLSTMTokenizerǁoov_characters__mutmut_*"
           "$t.xǁCharLSTMTokenizerǁ_lookup_table__mutmut_*" "$t.xǁCharLSTMTokenizerǁencode_corpus__mutmut_*"
           "$t.xǁCharLSTMTokenizerǁsave_vocabulary__mutmut_*")
}
scope_training() {
    modules='"src/char_lstm/training/checkpoints.py", "src/char_lstm/training/stateful.py", "src/char_lstm/training/resuming.py"'
    tests=('"tests/test_stateful.py::test_stateful_trainer_carries_the_state_and_resets_it_where_streams_start"'
           '"tests/test_stateful.py::test_stateful_checkpoint_saves_and_restores_the_training_streams"'
           '"tests/test_checkpoints.py::test_checkpoint_problem_names_what_is_missing_damaged_or_unsafe"'
           '"tests/test_checkpoints.py::test_latest_complete_checkpoint_sets_newer_incomplete_ones_aside"'
           '"tests/test_checkpoints.py::test_publish_moves_a_complete_folder_or_its_files_into_place_weights_last"'
           '"tests/test_checkpoints.py::test_finished_at_is_the_step_of_a_checkpoint_that_ends_the_run"')
    names=("$r.xǁStatefulTrainerǁcompute_loss__mutmut_*" "$r.xǁStatefulTrainerǁ_save_rng_state__mutmut_*"
           "$r.xǁStatefulTrainerǁ_load_rng_state__mutmut_*" "$c.x_checkpoint_step__mutmut_*"
           "$c.x_checkpoint_problem__mutmut_*" "$c.x_latest_complete_checkpoint__mutmut_*"
           "$c.x_publish_folder__mutmut_*" "$c.x_publish_files__mutmut_*" "$e.x_finished_at__mutmut_*"
           "$c.xǁCharLSTMTrainerǁ_get_output_dir__mutmut_*" "$c.xǁCharLSTMTrainerǁ_save_checkpoint__mutmut_*")
}

run_scope() {
    local scope=$1; shift
    "scope_$scope"
    if [ $# -gt 0 ]; then names=("$@"); fi
    local work=$base/$scope
    mkdir -p "$work"
    rm -rf "$work/src" "$work/tests" "$work/mutants"
    cp -r "$root/src" "$root/tests" "$work/"
    local IFS=,
    cat > "$work/pyproject.toml" <<TOML
[tool.mutmut]
source_paths = ["src"]
only_mutate = [$modules]
pytest_add_cli_args_test_selection = [${tests[*]}]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "no:timeout", "-W", "ignore"]
process_isolation = "forkserver"
TOML
    unset IFS
    (
        cd "$work"
        unset PYTHONPATH  # mutmut puts mutants/src first; the real src must not be importable
        export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
        nice -n 10 mutmut run --max-children "${MUTATION_JOBS:-2}" "${names[@]}" || true
        mutmut results --all true > results.txt
        python - "$scope" "${names[@]}" <<'PY'
import fnmatch, sys
scope, patterns = sys.argv[1], sys.argv[2:]
results = [l.strip().rsplit(": ", 1) for l in open("results.txt") if ": " in l]
scoped = [(n, s) for n, s in results if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
by_function = {}
for n, s in scoped:
    by_function.setdefault(n.rsplit("__mutmut_", 1)[0], []).append(s)
print(f"== {scope}")
for function, states in [("all", [s for _, s in scoped]), *by_function.items()]:
    killed = sum(s in ("killed", "timeout", "segfault") for s in states)  # mutmut counts a crash or a hang as a kill
    checked = sum(s != "not checked" for s in states)
    print(f"  {function}: {killed}/{checked} killed ({100 * killed / max(checked, 1):.0f}%), {len(states) - checked} not run")
print("  survivors:")
for n, s in scoped:
    if s not in ("killed", "timeout", "segfault", "not checked"):  # survived, no tests (reached by none), suspicious
        print("    ", n, s)
PY
    )
}

scopes=(modeling tokenizer training)
if [ $# -gt 0 ]; then scopes=("$1"); shift; fi
for scope in "${scopes[@]}"; do run_scope "$scope" "$@"; done
