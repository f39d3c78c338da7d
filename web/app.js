// The page's script: a char_lstm model generating in the visitor's browser, with no server.
//
// ONNX Runtime Web runs decode.onnx, the model's one-character step: one token id `input_ids (1, 1)` and the recurrent
// state in; the next token's logits `(1, 1, V)` and the next state out (per layer `(1, H)` tensors: h and c for an
// LSTM, h for a GRU or an RNN). The prompt goes through it one character at a time from the zero state, then every
// generated character; the state returned by one call is fed to the next as it is. model.json (written by
// `scripts/export.py --format web`) holds the vocabulary, the state's inputs, the generation settings and the model's
// facts. docs/export.md, "In the browser".

import * as ort from "./ort/ort.wasm.min.js";
import { Tokenizer, VisibleText, argmax, sample, seededRandom, visible } from "./decoding.js";

// One thread: WebAssembly threads need a cross-origin-isolated page, which static hosts (and http.server) do not give.
ort.env.wasm.numThreads = 1;
ort.env.wasm.wasmPaths = {  // this folder's copy, never a CDN (its loader renamed .js: see char_lstm/web_export.py)
  mjs: new URL("./ort/ort-wasm-simd-threaded.js", import.meta.url).href,
  wasm: new URL("./ort/ort-wasm-simd-threaded.wasm", import.meta.url).href,
};
ort.env.logLevel = "error";

const $ = (id) => document.getElementById(id);
class SettingError extends Error {}  // a control's value the page refuses (said in its status line), not a failure
const PAINT_EVERY_MS = 50;  // how often the text on the page is brought up to date while generating

// ---------------------------------------------------------------------------------------------------------------------
// The model: decode.onnx in ONNX Runtime Web, its state carried between calls.

class Model {
  constructor(session, info) {
    this.session = session;
    this.stateInputs = info.state_inputs;  // [{name, output, type, dims}]
  }

  static async load(info) {
    const session = await ort.InferenceSession.create(info.onnx_file, {
      executionProviders: ["wasm"], graphOptimizationLevel: "all",
    });
    return new Model(session, info);
  }

  zeroState() {
    const state = {};
    for (const input of this.stateInputs) {
      const size = input.dims.reduce((a, b) => a * b, 1);
      const data = input.type === "int64" ? new BigInt64Array(size) : new Float32Array(size);
      state[input.name] = new ort.Tensor(input.type, data, input.dims);
    }
    return state;
  }

  async step(token, state) {  // {logits: Float32Array(V), state}
    const feeds = { input_ids: new ort.Tensor("int64", BigInt64Array.of(BigInt(token)), [1, 1]), ...state };
    const out = await this.session.run(feeds);
    const next = {};
    for (const input of this.stateInputs) next[input.name] = out[input.output];
    return { logits: out.logits.data, state: next };
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// The page

function showFacts(markdown) {  // "**LSTM**, 2 layers ..." with its **bold** parts, as text nodes (never as HTML)
  const facts = $("facts");
  markdown.split("**").forEach((part, i) => {
    const node = i % 2 ? document.createElement("strong") : document.createTextNode(part);
    if (i % 2) node.textContent = part;
    facts.append(node);
  });
}

function setState(state, message, isError = false) {
  document.body.dataset.state = state;  // loading, ready, generating, done, error: what a test waits for
  $("status").textContent = message;
  $("status").className = isError ? "error" : "";
  const generating = state === "generating";
  const focused = document.activeElement;
  $("generate").disabled = state === "loading" || generating;
  $("stop").disabled = !generating;
  // the keyboard's focus follows the button that can be pressed: Stop while generating, Generate after
  if (generating && focused === $("generate")) $("stop").focus();
  if (!generating && focused === $("stop")) $("generate").focus();
}

function readSettings() {  // the controls' values, or an Error naming the control and the values it takes
  const number = (id) => {
    const input = $(id);
    const value = Number(input.value), low = Number(input.min), high = Number(input.max);
    const integer = input.step === "1";
    if (input.value.trim() === "" || !Number.isFinite(value) || value < low || value > high
        || (integer && !Number.isInteger(value))) {
      const label = input.parentElement.firstChild.textContent.trim();
      throw new SettingError(`${label} must be ${integer ? "a whole number" : "a number"} from ${low} to ${high}.`);
    }
    return value;
  };
  const greedy = $("greedy").checked;  // greedy reads neither the temperature nor top-p
  return {
    length: number("length"), greedy, seed: number("seed"),
    temperature: greedy ? 1 : number("temperature"), topP: greedy ? 1 : number("top_p"),
  };
}

function showUnknown(tokenizer) {
  const { unknown } = tokenizer.encode($("prompt").value);
  $("unknown").textContent = unknown.length === 0 ? "" : `Not in the model's vocabulary, read as ${
    tokenizer.unkToken}: ${unknown.map((c) => `"${visible(c)}"`).join(" ")}`;
}

// A task of its own for the page to paint and take a click on Stop: a message, which browsers do not slow down in a
// background tab (a setTimeout there runs once a second at most, which would all but stop a long generation).
const channel = new MessageChannel();
function nextTask() {
  return new Promise((resolve) => {
    channel.port1.onmessage = resolve;
    channel.port2.postMessage(null);
  });
}

async function generate(model, tokenizer, info, run) {
  const settings = readSettings();
  const { ids } = tokenizer.encode($("prompt").value);
  if (ids.length === 0 || ids.every((id) => id === tokenizer.unk)) {
    throw new SettingError("Type a prompt with characters of the model's training text.");
  }
  const eos = new Set(info.eos_token_ids);
  const random = seededRandom(settings.seed);
  const shown = new VisibleText();
  const text = document.createTextNode(shown.push($("prompt").value));
  $("output").replaceChildren(text);
  setState("generating", "Generating\u2026");
  const start = performance.now();
  let count = 0, pending = "", painted = start, ended = false;
  try {
    let out = { state: model.zeroState() };
    for (const id of ids) out = await model.step(id, out.state);
    while (count < settings.length && !run.stopped) {
      const id = settings.greedy ? argmax(out.logits) : sample(out.logits, settings.temperature, settings.topP, random);
      count += 1;
      pending += tokenizer.decode(id);
      if (eos.has(id)) { ended = true; break; }
      if (count < settings.length) out = await model.step(id, out.state);
      if (performance.now() - painted > PAINT_EVERY_MS) {
        text.appendData(shown.push(pending));
        pending = "";
        showRate(count, performance.now() - start);
        await nextTask();
        painted = performance.now();
      }
    }
  } finally {  // what was generated is shown, even when a step failed
    text.appendData(shown.push(pending) + shown.end());
  }
  const rate = showRate(count, performance.now() - start);
  const why = run.stopped ? " (stopped)" : ended ? " (the model ended the text)" : "";
  setState("done", `Generated ${count} characters at ${Math.round(rate)} characters/s${why}.`);
}

function showRate(count, milliseconds) {
  const rate = milliseconds > 0 ? (1000 * count) / milliseconds : 0;
  $("rate").dataset.charactersPerSecond = rate.toFixed(1);
  $("rate").dataset.characters = String(count);
  $("rate").textContent = `${count} characters, ${Math.round(rate)} characters/s`;
  return rate;
}

async function fetchJSON(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: ${response.status} ${response.statusText}`);
  return response.json();
}

function messageOf(error) {
  return String(error?.message ?? error);
}

async function main() {
  if (location.protocol === "file:") return;  // index.html says how to serve the page
  setState("loading", "Loading the model\u2026");
  const info = await fetchJSON("model.json");
  document.title = `${info.name}: char_lstm in your browser`;
  $("name").textContent = info.name;
  showFacts(info.facts);
  $("prompt").value = info.prompt;
  $("length").value = info.generation.max_new_tokens;
  $("temperature").value = info.generation.temperature;
  $("top_p").value = info.generation.top_p;
  const tokenizer = new Tokenizer(info);
  const model = await Model.load(info);
  showUnknown(tokenizer);
  $("prompt").addEventListener("input", () => showUnknown(tokenizer));
  let run = null;
  $("stop").addEventListener("click", () => { if (run) run.stopped = true; });
  $("controls").addEventListener("submit", async (event) => {
    event.preventDefault();
    if (run) return;
    run = { stopped: false };
    try {
      await generate(model, tokenizer, info, run);
    } catch (error) {
      const failed = !(error instanceof SettingError);
      setState("error", failed ? `Generation failed: ${messageOf(error)}` : error.message, true);
      if (failed) console.error(error);
    } finally {
      run = null;
    }
  });
  setState("ready", `Ready: ${info.name} runs in this page.`);
}

main().catch((error) => {
  setState("error", `The model could not be loaded: ${messageOf(error)}`, true);
  console.error(error);
});
