#!/usr/bin/env python
"""Share a trained char_lstm model on the Hugging Face Hub.

    python scripts/push_to_hub.py --model_dir outputs/shakespeare --repo_id you/char-shakespeare --dry_run
    python scripts/evaluate.py --model_name_or_path outputs/shakespeare --validation_file test.txt \
        --output_json eval.json
    python scripts/push_to_hub.py --model_dir outputs/shakespeare --repo_id you/char-shakespeare \
        --eval_results eval.json \
        --overwrite_output_dir                # the folder of the dry run is built again, then uploaded

Builds the complete repository folder (safetensors weights, config.json with auto_map, the code files for
trust_remote_code, tokenizer files, generation_config.json, README.md model card) in --output_dir (default
MODEL_DIR-hub), then uploads it with huggingface_hub (token from HF_TOKEN or `hf auth login`). --dry_run stops after
building the folder. --space you/char-demo also builds (in --space_dir, default MODEL_DIR-space) and uploads a Gradio
Space running demo/app.py on the model: app.py, requirements.txt pinned to the versions tested here, README.md with the
Spaces header. --web_space you/char-web also builds (in --web_space_dir, default MODEL_DIR-web-space) and uploads a
static Space running the model in the visitor's browser, with no server: the page of `scripts/export.py --format web`
(index.html, app.js, decode.onnx, model.json, ort/) and README.md with the Spaces header (sdk static, the model named);
it needs the export extra and `npm ci` (or --web_runtime).
"""

import sys

from char_lstm.cli import run_command
from char_lstm.hub import PushArguments, run_push


if __name__ == "__main__":
    sys.exit(run_command(PushArguments, run_push))
