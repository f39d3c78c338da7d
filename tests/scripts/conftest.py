import pytest

from helpers import shakespeare_like, write_text


def pytest_collection_modifyitems(items):
    for item in items:  # every test here runs a script in a subprocess (or several)
        if "tests/scripts/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory):
    """A tiny model trained for a few seconds with the real training code (shared by the script tests)."""
    from char_lstm.training import train
    from char_lstm.training.arguments import parse_arguments

    folder = tmp_path_factory.mktemp("trained")
    data = write_text(folder / "train.txt", shakespeare_like(8000))
    out = folder / "model"
    argv = ["--train_file", str(data), "--output_dir", str(out), "--embedding_size", "16", "--hidden_size", "32",
            "--dropout", "0.0", "--block_size", "32", "--per_device_train_batch_size", "8", "--max_steps", "40",
            "--eval_steps", "20", "--save_steps", "20", "--learning_rate", "1e-2", "--report_to", "none",
            "--sample_every_evals", "0", "--dataloader_pin_memory", "false"]
    train(*parse_arguments(argv))
    return out
