"""transformers' own common tests (ModelTesterMixin, ConfigTester, TokenizerTesterMixin, TrainingTesterMixin) run
against CharLSTM with each cell type, set up as transformers sets up its own recurrent models (Mamba, xLSTM).

The tests come from the source distribution of the installed transformers version, fetched once with
`pip download --no-deps --no-binary :all: transformers==VERSION` and kept under ~/.cache/char_lstm (or
$CHAR_LSTM_CACHE); without network or pip the module is skipped, saying why. The source distribution ships
tests/*.py but not the subpackages those files import; the cache gets minimal stand-ins for them (see `_STAND_INS`):
an empty GenerationTesterMixin and ExportTesterMixin (generate() has its own tests in test_generation_char_lstm.py),
`config_common_kwargs` (every PretrainedConfig attribute with a non-default value) and the sample text fixture.
"""

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unittest
import warnings
from pathlib import Path
from unittest import mock

import pytest
import transformers


VERSION = transformers.__version__
CACHE = Path(os.environ.get("CHAR_LSTM_CACHE", Path.home() / ".cache" / "char_lstm")) / f"transformers-{VERSION}-tests"
PACKAGE = "hf_common_tests"  # transformers' get_tests_dir() looks for a folder whose name ends with "tests"

_STAND_INS = {
    "generation/__init__.py": "",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "exporters/__init__.py": "",
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "utils/__init__.py": "",
    "utils/test_configuration_utils.py": (
        "config_common_kwargs = {\n"
        "    'return_dict': False, 'output_hidden_states': True, 'output_attentions': True, 'dtype': 'float16',\n"
        "    'chunk_size_feed_forward': 5, 'architectures': ['BertModel'], 'id2label': {0: 'label'},\n"
        "    'label2id': {'label': '0'}, 'problem_type': 'regression',\n"
        "}\n"
    ),
    "fixtures/sample_text.txt": (
        "This text is included to make sure Unicode is handled properly: 力加勝北区ᴵᴺᵀᵃছজটডণত\n"
        "Text should be one-sentence-per-line, with empty lines between documents.\n\n"
        "This sample text is public domain and was randomly selected from Project Gutenberg.\n"
    ),
}


def _fetch() -> str | None:
    """Make sure the tests are in the cache; the reason they cannot be, or None."""
    if (CACHE / PACKAGE / "test_modeling_common.py").is_file():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                 f"transformers=={VERSION}", "-d", tmp],
                capture_output=True, text=True, timeout=300,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"pip download of transformers=={VERSION} failed: {error}"
        archives = list(Path(tmp).glob("transformers-*.tar.gz"))
        if done.returncode != 0 or not archives:
            return f"pip download of transformers=={VERSION} failed: {done.stderr.strip().splitlines()[-1:]}"
        staging = Path(tempfile.mkdtemp(dir=CACHE.parent if CACHE.parent.exists() else None))
        try:
            return _unpack(archives[0], staging)
        finally:  # what is left when another run (an xdist worker) renamed its own copy first
            shutil.rmtree(staging, ignore_errors=True)


def _unpack(archive_path: Path, staging: Path) -> str | None:
    """The sdist's tests/*.py and the stand-ins into `staging`, then `staging` renamed to the cache folder."""
    package = staging / PACKAGE
    with tarfile.open(archive_path) as archive:
        for member in archive.getmembers():
            parts = Path(member.name).parts
            if len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py") and member.isfile():
                package.mkdir(parents=True, exist_ok=True)
                (package / parts[2]).write_bytes(archive.extractfile(member).read())
    if not (package / "test_modeling_common.py").is_file():
        return f"the transformers=={VERSION} source distribution has no tests/test_modeling_common.py"
    (package / "__init__.py").write_text("")
    for name, text in _STAND_INS.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text, encoding="utf-8")
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.rename(CACHE)  # complete or absent: another run may have finished first
    except OSError:
        pass
    return None


CACHE.parent.mkdir(parents=True, exist_ok=True)
_reason = _fetch()
if _reason is not None:
    pytest.skip(f"transformers' common tests are not available: {_reason}", allow_module_level=True)
for _module in ("parameterized",):
    pytest.importorskip(_module, reason=f"transformers' common tests need {_module} (pip install {_module})")
sys.path.insert(0, str(CACHE))
with warnings.catch_warnings():  # their marks (accelerate_tests, flash_attn_test...) are registered in their conftest:
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)  # ~50 warnings at the end of every suite run
    common = importlib.import_module(f"{PACKAGE}.test_modeling_common")
    config_common = importlib.import_module(f"{PACKAGE}.test_configuration_common")
    tokenization_common = importlib.import_module(f"{PACKAGE}.test_tokenization_common")
    training_mixin = importlib.import_module(f"{PACKAGE}.test_training_mixin")
    generation_stand_in = importlib.import_module(f"{PACKAGE}.generation.test_utils")

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from char_lstm import CharLSTMConfig, CharLSTMForCausalLM, CharLSTMModel, CharLSTMTokenizer  # noqa: E402
from char_lstm.cells_char_lstm import CELL_TYPES  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def listed_like_a_transformers_model():
    """The common tests pick labels and skips by the model's place in transformers' Auto mappings (a model inside
    transformers is listed there): CharLSTMModel as a base model, CharLSTMForCausalLM as a causal LM."""
    with mock.patch.dict(common.MODEL_MAPPING_NAMES, {"char_lstm": "CharLSTMModel"}), \
            mock.patch.dict(common.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, {"char_lstm": "CharLSTMForCausalLM"}):
        yield


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run fastest on one thread: with two on a busy 2-core machine a training step of the 2x16
    LSTM took 99 ms instead of 9 ms. The setting is restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class CharLSTMModelTester:
    """Tiny configs and inputs, as transformers' `*ModelTester` classes make them. The special ids are the
    tokenizer's (`<pad>` 0, `<unk>` 1), and every batch has a row of `<unk>` only: a model reads every id of its
    vocabulary (test_training_overfit prompts generate() with id 1 alone)."""

    pad_token_id, unk_token_id = 0, 1

    def __init__(self, parent, cell_type, batch_size=2, seq_length=7, vocab_size=40, hidden_size=16,
                 embedding_size=16, num_hidden_layers=2):
        self.parent, self.cell_type = parent, cell_type
        self.batch_size, self.seq_length, self.vocab_size = batch_size, seq_length, vocab_size
        self.hidden_size, self.embedding_size, self.num_hidden_layers = hidden_size, embedding_size, num_hidden_layers
        self.is_training = True
        self.causal_lm_class, self.base_model_class = CharLSTMForCausalLM, CharLSTMModel

    def get_config(self):
        return CharLSTMConfig(
            vocab_size=self.vocab_size, embedding_size=self.embedding_size, hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers, dropout=0.0, cell_type=self.cell_type,
            pad_token_id=self.pad_token_id, unk_token_id=self.unk_token_id,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = common.ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_ids[-1] = self.unk_token_id
        attention_mask = torch.ones_like(input_ids)
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class RecurrentGenerationTests:
    """What transformers' GenerationTesterMixin checks of a recurrent-state model (the mixin is not in the source
    distribution: the stand-in is empty), on the model tester's tiny config and batch."""

    def _model_and_inputs(self, **config_changes):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        for name, value in config_changes.items():
            setattr(config, name, value)
        torch.manual_seed(0)
        return CharLSTMForCausalLM(config).eval(), config, inputs["input_ids"]

    def _check_recurrent_cache(self, cache, config, batch_size):
        """The cache's format: one recurrent-state layer per recurrent layer, each holding the cell's states (h and c
        for an LSTM, h otherwise), each (batch, hidden), read through the cache's public methods."""
        self.assertIsInstance(cache, DynamicCache)
        self.assertEqual(len(cache.layers), config.num_hidden_layers)
        for layer_idx in range(config.num_hidden_layers):
            self.assertTrue(cache.has_previous_state(layer_idx))
            for state_idx in range(config.number_of_conv_states):
                state = cache.get_recurrent_state(layer_idx, state_idx)
                self.assertEqual(tuple(state.shape), (batch_size, config.hidden_size))

    def test_generate_dict_outputs_use_cache(self):
        model, config, input_ids = self._model_and_inputs()
        out = model.generate(input_ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                             output_scores=True, output_logits=True, use_cache=True)
        batch_size, length = input_ids.shape
        self.assertEqual(tuple(out.sequences.shape), (batch_size, length + 4))
        self.assertEqual([tuple(s.shape) for s in out.scores], [(batch_size, config.vocab_size)] * 4)
        self.assertEqual(len(out.logits), 4)
        self._check_recurrent_cache(out.past_key_values, config, batch_size)

    def test_past_key_values_format(self):
        model, config, input_ids = self._model_and_inputs()
        with torch.no_grad():
            outputs = model(input_ids, use_cache=True)
        self._check_recurrent_cache(outputs.cache, config, input_ids.shape[0])
        self.assertIsNone(model(input_ids, use_cache=False).cache)

    def test_greedy_generate_with_and_without_cache_is_the_same(self):
        model, _, input_ids = self._model_and_inputs()
        cached = model.generate(input_ids, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(input_ids, max_new_tokens=6, do_sample=False, use_cache=False)
        self.assertTrue(torch.equal(cached, uncached))

    def test_left_padding_compatibility(self):
        """Left padding changes nothing at the real positions: the next-token logits of each row equal those of the
        row alone, padding of any width in front."""
        model, config, input_ids = self._model_and_inputs()
        with torch.no_grad():
            plain = model(input_ids, attention_mask=torch.ones_like(input_ids)).logits[:, -1]
            for width in (1, 3):
                pad = torch.full((input_ids.shape[0], width), config.pad_token_id)
                mask = torch.cat([torch.zeros_like(pad), torch.ones_like(input_ids)], dim=1)
                padded = model(torch.cat([pad, input_ids], dim=1), attention_mask=mask).logits[:, -1]
                torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-5)

    def test_padding_inside_a_continued_forward(self):
        """A forward that continues from a cache, with padding inside its new tokens: its real positions and the
        state it leaves are those of the new tokens without the padding."""
        model, config, input_ids = self._model_and_inputs()
        first, second = input_ids[:, :3], input_ids[:, 3:]
        with torch.no_grad():
            plain_cache = model(first, use_cache=True).cache
            plain = model(second, cache=plain_cache).logits
            padded_cache = model(first, use_cache=True).cache
            pad = torch.full((input_ids.shape[0], 2), config.pad_token_id)
            with_pad = torch.cat([second[:, :1], pad, second[:, 1:]], dim=1)
            mask = torch.ones_like(with_pad)
            mask[:, 1:3] = 0
            full_mask = torch.cat([torch.ones_like(first), mask], dim=1)  # the mask of the whole sequence
            padded = model(with_pad, attention_mask=full_mask, cache=padded_cache).logits
        real = mask.bool()[0]
        torch.testing.assert_close(padded[:, real], plain, rtol=1e-5, atol=1e-5)
        self._check_caches_are_equal(padded_cache, plain_cache)

    def test_generate_without_input_ids(self):
        """generate() with no prompt starts from the beginning-of-sequence id, as from that id alone."""
        model, config, _ = self._model_and_inputs(bos_token_id=2)
        model.generation_config.bos_token_id = 2
        alone = model.generate(max_new_tokens=5, do_sample=False)
        self.assertEqual(alone[0, 0].item(), 2)
        self.assertTrue(torch.equal(alone, model.generate(torch.tensor([[2]]), max_new_tokens=5, do_sample=False)))

    def test_generate_continue_from_the_returned_cache(self):
        """Generating 3 tokens, then 3 more from the returned cache and the sequences so far, gives the 6 tokens
        generated at once. (With the mask of the sequences: a tiny model may generate the pad id, which
        generate() would otherwise take for padding.)"""
        model, _, input_ids = self._model_and_inputs()
        at_once = model.generate(input_ids, max_new_tokens=6, do_sample=False)
        first = model.generate(input_ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        more = model.generate(first.sequences, attention_mask=torch.ones_like(first.sequences),
                              cache=first.past_key_values, max_new_tokens=3, do_sample=False)
        self.assertTrue(torch.equal(more, at_once))


class _CharLSTMCommonTests(common.ModelTesterMixin, generation_stand_in.GenerationTesterMixin,
                           training_mixin.TrainingTesterMixin, RecurrentGenerationTests):
    """The settings transformers gives its recurrent models (Mamba, xLSTM)."""

    cell_type = None
    all_model_classes = (CharLSTMModel, CharLSTMForCausalLM)
    has_attentions = False  # a recurrent model has no attention weights
    test_missing_keys = False  # as Mamba: every weight is needed
    test_torch_exportable = False  # the stand-in ExportTesterMixin has no export tests
    # a tiny recurrent model: fewer steps at a larger rate than transformers' default (300 at 1e-3), as models may set
    # (measured: loss down 99/100/100%, grad norm down 96/98/99% for lstm/gru/rnn)
    training_overfit_steps = 100
    training_overfit_learning_rate = 2e-2
    _model_tester = None

    @property
    def model_tester(self):
        return self._model_tester

    def setUp(self):
        self._model_tester = CharLSTMModelTester(self, self.cell_type)
        self.config_tester = config_common.ConfigTester(
            self, config_class=CharLSTMConfig, hidden_size=16, cell_type=self.cell_type,
            common_properties=["hidden_size", "num_hidden_layers", "vocab_size"],
        )

    def test_config(self):
        self.config_tester.run_common_tests()


    def _check_caches_are_equal(self, cache1, cache2):
        """(GenerationTesterMixin's helper, which the stand-in lacks.) Recurrent-state caches: the same states."""
        self.assertEqual(len(cache1.layers), len(cache2.layers))
        for layer1, layer2 in zip(cache1.layers, cache2.layers):
            self.assertEqual(layer1.recurrent_states.keys(), layer2.recurrent_states.keys())
            for key, state in layer1.recurrent_states.items():
                torch.testing.assert_close(state, layer2.recurrent_states[key])


# One test class per cell type of the registry: CharLSTMLSTMCommonTest, CharLSTMGRUCommonTest, ...
for _cell_type in CELL_TYPES:
    _name = f"CharLSTM{_cell_type.upper()}CommonTest"
    globals()[_name] = type(_name, (_CharLSTMCommonTests, unittest.TestCase), {"cell_type": _cell_type})


class CharLSTMTokenizationCommonTest(tokenization_common.TokenizerTesterMixin, unittest.TestCase):
    tokenizer_class = CharLSTMTokenizer
    test_seq2seq = False

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        text = cls._data + tokenization_common.TokenizerTesterMixin.integration_test_input_string
        CharLSTMTokenizer.from_corpus(text, document_boundary=True).save_pretrained(cls.tmpdirname)
