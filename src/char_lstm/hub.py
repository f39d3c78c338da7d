"""Sharing CharLSTM models: the Hub folder, the Spaces (the Gradio demo; the page running the model in the browser)
and the upload. The model card is `char_lstm.model_card`; loading is `char_lstm.loading`; the page is
`char_lstm.web_export`."""

import importlib.metadata
import json
import os
import re
import shutil
from dataclasses import dataclass, field

import torch
import yaml
from huggingface_hub import HfApi, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

from . import facts, terminal
from .errors import UsageError
from .export import check_format, export_for_generation
from .loading import load_model_and_tokenizer, missing_folder_message
from .model_card import (
    RUN_INFO_NAME,
    TOKENIZER_FILES,
    TRAINING_CURVES_NAME,
    packaged_file,
    results_from_training,
    write_model_card,
)
from .web_export import check_page_greedy, find_runtime, first_prompt, write_web_folder


SPACE_APP = packaged_file("demo", "app.py")  # the Gradio demo, the app of the Space that --space builds
WEB_PROMPT = "\n"  # the page's first prompt in the Space that --web_space builds (scripts/export.py's default)
WEB_CHECK_CHARACTERS = 100  # greedy characters compared with generate() before the Space is uploaded


class HubError(UsageError):
    """A problem preparing or uploading a Hub repository, in one line with the way out."""


def check_repo_id(repo_id: str, flag: str = "--repo_id") -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        reason = str(error).splitlines()[0]
        raise HubError(f"Invalid {flag} {repo_id!r}: {reason} (expected 'name' or 'user/name').")


def check_model_dir(model_dir: str) -> None:
    if not os.path.isdir(model_dir):
        raise HubError(missing_folder_message(model_dir, "--model_dir"))
    missing = [name for name in ("config.json", *TOKENIZER_FILES) if not os.path.isfile(os.path.join(model_dir, name))]
    weights = ("model.safetensors", "model.safetensors.index.json")
    if not any(os.path.isfile(os.path.join(model_dir, name)) for name in weights):
        missing.append("model.safetensors")
    if missing:
        raise HubError(
            f"--model_dir {model_dir} is incomplete: {', '.join(missing)} missing; give a folder written by "
            "scripts/train.py (or by model.save_pretrained + tokenizer.save_pretrained)."
        )


def _make_empty(folder: str, flag: str, overwrite: bool) -> bool:
    """Whether `folder` (given as `flag`) holds files to remove first; without --overwrite_output_dir, a HubError."""
    if not (os.path.isdir(folder) and os.listdir(folder)):
        return False
    if not overwrite:
        raise HubError(f"{folder} is not empty: choose another {flag} or pass --overwrite_output_dir.")
    return True


def check_folders(model_dir: str, folders: dict[str, str]) -> None:
    """The folders to build ({flag: folder}) are distinct and none holds the model (each is emptied first)."""
    source, flags = os.path.realpath(model_dir), {}
    for flag, folder in folders.items():
        target = os.path.realpath(folder)
        if source == target or source.startswith(target + os.sep):
            raise HubError(f"{flag} {folder} would replace the model in --model_dir {model_dir}; choose another "
                           "folder.")
        if target in flags:
            raise HubError(f"{flag} {folder} is also the {flags[target]}: choose another {flag}.")
        flags[target] = flag


def build_hub_folder(
    model_dir: str,
    folder: str,
    repo_id: str,
    eval_results: dict | None = None,
    overwrite: bool = False,
    license: str = "apache-2.0",
) -> str:
    """Write the complete repository for `repo_id` into `folder`: safetensors weights, config.json with auto_map, the
    code files for trust_remote_code, tokenizer files, generation_config.json, README.md (the model card) and the
    training curves' picture when the model folder has one."""
    check_repo_id(repo_id)
    check_model_dir(model_dir)
    check_folders(model_dir, {"--output_dir": folder})
    model, tokenizer = load_model_and_tokenizer(model_dir)  # before anything is deleted
    if _make_empty(folder, "--output_dir", overwrite):
        shutil.rmtree(folder)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)  # model.safetensors, config.json (auto_map), generation_config.json, code files
    tokenizer.save_pretrained(folder)

    run = {}
    run_path = os.path.join(model_dir, RUN_INFO_NAME)
    if os.path.isfile(run_path):
        with open(run_path, encoding="utf-8") as f:
            run = json.load(f)
    results = dict(eval_results or {})
    if not results and os.path.isfile(os.path.join(model_dir, "all_results.json")):
        with open(os.path.join(model_dir, "all_results.json"), encoding="utf-8") as f:
            results = results_from_training(json.load(f))
    if os.path.isfile(os.path.join(model_dir, TRAINING_CURVES_NAME)):
        shutil.copyfile(os.path.join(model_dir, TRAINING_CURVES_NAME), os.path.join(folder, TRAINING_CURVES_NAME))
    write_model_card(folder, model, run, results, repo_id, license=license, tokenizer=tokenizer)
    return folder


def tested_versions() -> dict:
    """The installed gradio, torch and transformers, which a Space is pinned to: the versions tested here."""
    try:
        return {name: importlib.metadata.version(name).split("+")[0]  # 2.13.0+cpu: the PyPI release 2.13.0
                for name in ("gradio", "torch", "transformers")}
    except importlib.metadata.PackageNotFoundError as error:
        raise HubError(f"--space needs {error.name} installed, to pin the Space to the version tested here: "
                       'pip install -e ".[demo]".') from None


def build_space_folder(folder: str, space_id: str, model_repo_id: str, overwrite: bool = False) -> str:
    """Write a ready-to-push Gradio Space for `space_id` into `folder`, running the demo (demo/app.py) on the model
    `model_repo_id`: app.py with MODEL_ID set and TRUST_REMOTE_CODE on (char_lstm is not installed there: the model's
    own code loads it, and the Space's owner chose the model), facts.py and terminal.py (the app shows the model's
    facts and control characters with them), requirements.txt pinned to the installed torch and transformers (the
    versions tested here) and README.md with the Spaces YAML header (sdk_version: the installed gradio)."""
    check_repo_id(space_id, "--space")
    versions = tested_versions()
    with open(SPACE_APP, encoding="utf-8") as f:
        app = f.read()
    for line, value in (("MODEL_ID = None", f"MODEL_ID = {model_repo_id!r}"),
                        ("TRUST_REMOTE_CODE = False", "TRUST_REMOTE_CODE = True")):
        app, found = re.subn(rf"^{re.escape(line)}\b", value, app, count=1, flags=re.M)
        if not found:
            raise HubError(f"{SPACE_APP} has no `{line}` line to set in the Space's copy.")
    if _make_empty(folder, "--space_dir", overwrite):
        shutil.rmtree(folder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "app.py"), "w", encoding="utf-8") as f:
        f.write(app)
    for module in (facts, terminal):  # what the app imports from char_lstm, which a Space does not have
        shutil.copyfile(module.__file__, os.path.join(folder, os.path.basename(module.__file__)))
    with open(os.path.join(folder, "requirements.txt"), "w", encoding="utf-8") as f:
        f.write("# the versions char_lstm's demo was tested with (gradio: sdk_version in README.md)\n"
                f"torch=={versions['torch']}\ntransformers=={versions['transformers']}\n")
    header = {"title": space_id.split("/")[-1], "emoji": "\u270d\ufe0f", "colorFrom": "indigo", "colorTo": "gray",
              "sdk": "gradio", "sdk_version": versions["gradio"], "app_file": "app.py", "models": [model_repo_id],
              "short_description": "Character-level LSTM language model: type a prompt"}
    write_space_card(folder, header, f"A demo of the character-level language model "
                     f"[{model_repo_id}](https://huggingface.co/{model_repo_id}): type a prompt, choose the length, "
                     "temperature, top-p and seed, and watch the characters come.")
    return folder


def write_space_card(folder: str, header: dict, body: str) -> None:
    """The Space's README.md: the Spaces YAML header (https://huggingface.co/docs/hub/spaces-config-reference), its
    title and `body`."""
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(f"---\n{yaml.safe_dump(header, sort_keys=False, allow_unicode=True)}---\n\n"
                f"# {header['title']}\n\n{body}\n")


def check_web_space(space_id: str, folder: str, overwrite: bool = False, runtime_dir: str | None = None) -> str:
    """What --web_space needs, checked before any work: its id, the ONNX export's packages, onnxruntime-web's files
    and an empty --web_space_dir (unless `overwrite`). Returns the runtime's folder."""
    check_repo_id(space_id, "--web_space")
    try:
        check_format("web")
        runtime = find_runtime(runtime_dir)
    except UsageError as error:  # worded for scripts/export.py --format web
        message = str(error)
        raise HubError(message.replace("--format web", "--web_space", 1) if message.startswith("--format web")
                       else f"--web_space: {message}") from None
    _make_empty(folder, "--web_space_dir", overwrite)
    return runtime


def build_web_space_folder(model_dir: str, folder: str, space_id: str, model_repo_id: str, overwrite: bool = False,
                           runtime_dir: str | None = None) -> str:
    """Write a ready-to-push static Space for `space_id` into `folder`: the page of `scripts/export.py --format web`
    running the model of `model_dir` in the visitor's browser (index.html, app.js, decode.onnx, model.json naming the
    model `model_repo_id`, ort/ with onnxruntime-web's WebAssembly build; `char_lstm.web_export`), and README.md with
    the Spaces YAML header (sdk static, the model in `models`). Nothing runs on a server: no Python code."""
    runtime = check_web_space(space_id, folder, overwrite, runtime_dir)
    check_model_dir(model_dir)
    check_folders(model_dir, {"--web_space_dir": folder})
    model, tokenizer = load_model_and_tokenizer(model_dir, device="cpu", dtype=torch.float32)
    prompt = first_prompt(tokenizer, WEB_PROMPT)
    input_ids = tokenizer([prompt], return_tensors="pt")["input_ids"]
    exported = export_for_generation(model, input_ids, "onnx")  # the page runs its decode graph
    # the page's title: the model's repository, not the local folder's name
    write_web_folder(exported, model, tokenizer, folder, model_dir, prompt, runtime, name=model_repo_id,
                     overwrite=overwrite, flag="--web_space_dir")
    # checked as scripts/export.py --format web checks it: greedy text through the page's files is generate()'s
    check = check_page_greedy(model, folder, input_ids, WEB_CHECK_CHARACTERS)
    if not check.equal:
        raise HubError(f"--web_space: the page's greedy text through {folder}/decode.onnx differs from generate()'s "
                       f"from token {check.first_difference} on; nothing was uploaded (the files are in {folder}).")
    header = {"title": space_id.split("/")[-1], "emoji": "\U0001f310", "colorFrom": "indigo", "colorTo": "gray",
              "sdk": "static", "app_file": "index.html", "models": [model_repo_id],
              "short_description": "A character-level LSTM writing in your browser"}
    write_space_card(folder, header, f"The character-level language model [{model_repo_id}]"
                     f"(https://huggingface.co/{model_repo_id}), running in your browser: ONNX Runtime Web "
                     "(WebAssembly) runs its one-character step, `decode.onnx`, with no server. Type a prompt, choose "
                     "the length, temperature and top-p, and watch the characters come.")
    return folder


def require_token(token: str | None = None) -> str:
    """`token`, else HF_TOKEN, else the saved login; a one-line error saying how to log in when there is none."""
    token = token or get_token()
    if not token:
        raise HubError(
            "No Hugging Face token: log in with `hf auth login` (or `huggingface-cli login`), or set HF_TOKEN to a "
            "token with write access (https://huggingface.co/settings/tokens)."
        )
    return token


def push_folder(
    folder: str,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload char_lstm model",
    token: str | None = None,
    repo_type: str = "model",
    space_sdk: str = "gradio",
) -> str:
    """`create_repo` + `upload_folder`; returns the commit URL. The token comes from `token`, HF_TOKEN or the login.
    `repo_type="space"` creates a Space with `space_sdk` (gradio; static for a page)."""
    check_repo_id(repo_id)
    api = HfApi(token=require_token(token))
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type,
                    space_sdk=space_sdk if repo_type == "space" else None)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type=repo_type)
    commit = api.upload_folder(folder_path=folder, repo_id=repo_id, revision=revision, commit_message=commit_message,
                               repo_type=repo_type)
    return getattr(commit, "commit_url", str(commit))


@dataclass
class PushArguments:
    model_dir: str = field(metadata={"help": "The trained model: the --output_dir of scripts/train.py."})
    repo_id: str = field(metadata={"help": "The Hub repository, 'name' or 'user/name'."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Where to build the repository folder (default: MODEL_DIR-hub)."}
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a non-empty --output_dir."})
    eval_results: str | None = field(
        default=None, metadata={"help": "JSON written by scripts/evaluate.py, for the card's model-index."}
    )
    license: str = field(default="apache-2.0", metadata={"help": "License in the card's metadata."})
    private: bool = field(default=False, metadata={"help": "Create the repository as private."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to (created if needed)."})
    commit_message: str = field(default="Upload char_lstm model", metadata={"help": "The commit message."})
    dry_run: bool = field(default=False, metadata={"help": "Build the folder only; upload nothing."})
    space: str | None = field(
        default=None, metadata={"help": "Also a Gradio Space 'name' or 'user/name' with the demo of --repo_id."}
    )
    space_dir: str | None = field(
        default=None, metadata={"help": "Where to build the Space's folder (default: MODEL_DIR-space)."}
    )
    web_space: str | None = field(default=None, metadata={
        "help": "Also a static Space 'name' or 'user/name' running --repo_id in the visitor's browser (the page of "
                "scripts/export.py --format web; needs the export extra and `npm ci`)."})
    web_space_dir: str | None = field(
        default=None, metadata={"help": "Where to build the static Space's folder (default: MODEL_DIR-web-space)."}
    )
    web_runtime: str | None = field(default=None, metadata={
        "help": "--web_space: the dist folder of onnxruntime-web (default: node_modules/onnxruntime-web/dist of the "
                "char_lstm checkout, after `npm ci`)."})


def load_eval_results(path: str) -> dict:
    """{mode: metrics} from a scripts/evaluate.py JSON file, with the data and block size kept for the card."""
    if not os.path.isfile(path):
        raise HubError(f"--eval_results {path} does not exist; give the JSON written by scripts/evaluate.py.")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (ValueError, UnicodeDecodeError) as error:  # json.JSONDecodeError is a ValueError
        raise HubError(f"--eval_results {path} is not valid JSON ({error}); give the JSON written by "
                       "scripts/evaluate.py.") from None
    if not isinstance(raw, dict):
        raise HubError(f"--eval_results {path} holds a {type(raw).__name__}, not the JSON object written by "
                       "scripts/evaluate.py.")
    modes = {mode: raw[mode] for mode in ("fixed", "streaming") if mode in raw}
    if not modes:
        raise HubError(
            f"{path} holds no 'fixed' or 'streaming' results: give the JSON written by scripts/evaluate.py."
        )
    for values in modes.values():
        values.setdefault("data", raw.get("data"))
        values.setdefault("block_size", raw.get("block_size"))
    return modes


def run_push(args: PushArguments) -> str:
    """Build the repository folder (and the Spaces', with --space and --web_space) and, unless --dry_run, upload them;
    returns the repository folder."""
    check_repo_id(args.repo_id)
    if not args.dry_run:
        require_token()  # before any work
    folder = args.output_dir or os.path.normpath(args.model_dir) + "-hub"
    results = load_eval_results(args.eval_results) if args.eval_results else None
    space = args.space_dir or os.path.normpath(args.model_dir) + "-space"
    web = args.web_space_dir or os.path.normpath(args.model_dir) + "-web-space"
    check_folders(args.model_dir, {"--output_dir": folder, **({"--space_dir": space} if args.space else {}),
                                   **({"--web_space_dir": web} if args.web_space else {})})
    if args.space:  # before any work
        check_repo_id(args.space, "--space")
        tested_versions()
        _make_empty(space, "--space_dir", args.overwrite_output_dir)
    if args.web_space:
        check_web_space(args.web_space, web, args.overwrite_output_dir, args.web_runtime)
    elif args.web_runtime is not None:
        raise HubError("--web_runtime is for --web_space: add --web_space NAME, or leave --web_runtime out.")
    build_hub_folder(args.model_dir, folder, args.repo_id, results, overwrite=args.overwrite_output_dir,
                     license=args.license)
    print(f"built {folder}: {', '.join(sorted(os.listdir(folder)))}")
    if args.space:
        build_space_folder(space, args.space, args.repo_id, overwrite=args.overwrite_output_dir)
        print(f"built {space}: {', '.join(sorted(os.listdir(space)))}")
    if args.web_space:
        build_web_space_folder(args.model_dir, web, args.web_space, args.repo_id, args.overwrite_output_dir,
                               args.web_runtime)
        print(f"built {web}: {', '.join(sorted(os.listdir(web)))}")
    if not args.dry_run:
        url = push_folder(folder, args.repo_id, args.private, args.revision, args.commit_message)
        print(f"pushed to https://huggingface.co/{args.repo_id} ({url})")
        if args.space:
            url = push_folder(space, args.space, args.private, commit_message="char_lstm demo", repo_type="space")
            print(f"pushed to https://huggingface.co/spaces/{args.space} ({url})")
        if args.web_space:
            url = push_folder(web, args.web_space, args.private, commit_message="char_lstm in the browser",
                              repo_type="space", space_sdk="static")
            print(f"pushed to https://huggingface.co/spaces/{args.web_space} ({url})")
    return folder
