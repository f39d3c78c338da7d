// The page's script: a char_lstm model generating in the visitor's browser, with no server.
//
// ONNX Runtime Web runs decode.onnx, the model's one-character step: one token id `input_ids (1, 1)` and the recurrent
// state in; the next token's logits `(1, 1, V)` and the next state out (per layer `(1, H)` tensors: h and c for an
// LSTM, h for a GRU or an RNN). The prompt goes through it one character at a time from the zero state, then every
// generated character; the state returned by one call is fed to the next as it is. model.json (written by
// `scripts/export.py --format web`) holds the vocabulary, the state's inputs, the generation settings and the model's
// facts. docs/export.md, "In the browser".

import * as ort from "./ort/ort.wasm.min.js";

// One thread: WebAssembly threads need a cross-origin-isolated page, which static hosts (and http.server) do not give.
ort.env.wasm.numThreads = 1;
ort.env.wasm.wasmPaths = {  // this folder's copy, never a CDN (its loader renamed .js: see char_lstm/web_export.py)
  mjs: new URL("./ort/ort-wasm-simd-threaded.js", import.meta.url).href,
  wasm: new URL("./ort/ort-wasm-simd-threaded.wasm", import.meta.url).href,
};
ort.env.logLevel = "error";

const $ = (id) => document.getElementById(id);
const PAINT_EVERY_MS = 50;  // how often the text on the page is brought up to date while generating

// ---------------------------------------------------------------------------------------------------------------------
// Control characters shown as escapes, as char_lstm.terminal.visible_controls does: a model can write an ESC, a lone
// carriage return or a bidirectional override (which reorders the rest of the line); they are shown as \x1b, \r,
// \u202e. Line feeds, tabs, "\r\n" and every other character stay as they are.

const SHOWN_CODES = new Set([
  ...Array.from({ length: 0x20 }, (_, code) => code).filter((code) => code !== 0x09 && code !== 0x0a),
  0x7f, ...Array.from({ length: 0x20 }, (_, i) => 0x80 + i),
  0x202a, 0x202b, 0x202c, 0x202d, 0x202e, 0x2066, 0x2067, 0x2068, 0x2069,
]);

function escapeOf(code) {  // Python's ascii() form: \x1b, \x85, \u202e
  return code < 0x100 ? "\\x" + code.toString(16).padStart(2, "0") : "\\u" + code.toString(16).padStart(4, "0");
}

class VisibleText {
  // Shows a text arriving in pieces; a carriage return waits for the next character ("\r\n" ends a line).
  constructor() { this.carriageReturn = false; }

  push(text) {
    let shown = "";
    for (const character of text) {
      if (this.carriageReturn) {
        shown += character === "\n" ? "\r" : "\\r";
        this.carriageReturn = false;
      }
      if (character === "\r") {
        this.carriageReturn = true;
        continue;
      }
      const code = character.codePointAt(0);
      shown += SHOWN_CODES.has(code) ? escapeOf(code) : character;
    }
    return shown;
  }

  end() {
    const shown = this.carriageReturn ? "\\r" : "";
    this.carriageReturn = false;
    return shown;
  }
}

function visible(text) {
  const shown = new VisibleText();
  return shown.push(text) + shown.end();
}

// ---------------------------------------------------------------------------------------------------------------------
// The tokenizer: one token per Unicode code point, as CharLSTMTokenizer encodes (its special tokens, typed as they
// are written, are one token each); a character outside the vocabulary is the unknown token.

class Tokenizer {
  constructor(info) {
    this.tokens = info.tokens;  // the text of each id; "" for special tokens (skipped when decoding)
    this.unk = info.unk_token_id;
    this.unkToken = info.unk_token;
    this.before = info.ids_before;  // what encoding adds around a text (a model trained with <bos>/<eos>)
    this.after = info.ids_after;
    this.special = [...info.special_tokens].sort((a, b) => b.content.length - a.content.length);
    this.ids = new Map();
    info.tokens.forEach((token, id) => { if (token !== "" && !this.ids.has(token)) this.ids.set(token, id); });
  }

  encode(text) {  // {ids, unknown: the distinct characters read as the unknown token}
    const ids = [...this.before];
    const unknown = new Set();
    let position = 0;
    while (position < text.length) {
      const special = this.special.find((token) => text.startsWith(token.content, position));
      if (special) {
        ids.push(special.id);
        position += special.content.length;
        continue;
      }
      const character = String.fromCodePoint(text.codePointAt(position));
      const id = this.ids.get(character);
      if (id === undefined) unknown.add(character);
      ids.push(id === undefined ? this.unk : id);
      position += character.length;
    }
    return { ids: ids.concat(this.after), unknown: [...unknown] };
  }

  decode(id) { return this.tokens[id] ?? ""; }
}

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
// Choosing the next character: the likeliest (greedy, the first of equal ones, as torch.argmax), or a draw from the
// softmax of logits / temperature, kept to the smallest set of likeliest characters whose probability reaches top-p
// (transformers' TopPLogitsWarper), with a seeded generator: the same seed gives the same text.

function seededRandom(seed) {  // mulberry32: a uniform number in [0, 1) per call
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function argmax(logits) {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  return best;
}

function sample(logits, temperature, topP, random) {
  const largest = logits[argmax(logits)];
  const weights = new Float64Array(logits.length);
  let total = 0;
  for (let i = 0; i < logits.length; i++) total += weights[i] = Math.exp((logits[i] - largest) / temperature);
  let smallest = 0;  // the smallest weight kept: all of them, unless top-p keeps fewer
  if (topP < 1) {  // the likeliest first, until their sum reaches top-p
    // sorted: the weights over 1e-4 of the largest, where they reach top-p (a trained model's few), else all of them
    let sorted = weights.filter((weight) => weight >= 1e-4);
    if (sorted.reduce((sum, weight) => sum + weight, 0) < topP * total) sorted = weights.slice();
    sorted.sort();
    let kept = 0, i = sorted.length;
    while (i > 0 && kept < topP * total) kept += sorted[--i];
    smallest = sorted[i];
    total = kept;
  }
  let draw = random() * total;
  for (let i = 0; i < weights.length; i++) {
    if (weights[i] >= smallest && (draw -= weights[i]) < 0) return i;
  }
  return argmax(logits);  // rounding left a sliver: the likeliest
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
  $("generate").disabled = state === "loading" || state === "generating";
  $("stop").disabled = state !== "generating";
}

function readSettings() {  // the controls' values, or an Error naming the control and the values it takes
  const number = (id) => {
    const input = $(id);
    const value = Number(input.value), low = Number(input.min), high = Number(input.max);
    const integer = input.step === "1";
    if (input.value.trim() === "" || !Number.isFinite(value) || value < low || value > high
        || (integer && !Number.isInteger(value))) {
      const label = input.parentElement.firstChild.textContent.trim();
      throw new Error(`${label} must be ${integer ? "a whole number" : "a number"} from ${low} to ${high}.`);
    }
    return value;
  };
  return {
    length: number("length"), temperature: number("temperature"), topP: number("top_p"), seed: number("seed"),
    greedy: $("greedy").checked,
  };
}

function showUnknown(tokenizer) {
  const { unknown } = tokenizer.encode($("prompt").value);
  $("unknown").textContent = unknown.length === 0 ? "" : `Not in the model's vocabulary, read as ${
    tokenizer.unkToken}: ${unknown.map((c) => `"${visible(c)}"`).join(" ")}`;
}

async function generate(model, tokenizer, info, run) {
  const settings = readSettings();
  const { ids } = tokenizer.encode($("prompt").value);
  if (ids.every((id) => id === tokenizer.unk || tokenizer.tokens[id] === "")) {
    throw new Error("Type a prompt with characters of the model's training text.");
  }
  const eos = new Set(info.eos_token_ids);
  const random = seededRandom(settings.seed);
  const shown = new VisibleText();
  const text = document.createTextNode(shown.push($("prompt").value));
  $("output").replaceChildren(text);
  setState("generating", "Generating\u2026");
  let out = { state: model.zeroState() };
  for (const id of ids) out = await model.step(id, out.state);
  const start = performance.now();
  let count = 0, pending = "", painted = start, ended = false;
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
      await new Promise((resolve) => setTimeout(resolve));  // let the page paint and take a click on Stop
      painted = performance.now();
    }
  }
  text.appendData(shown.push(pending) + shown.end());
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

async function main() {
  if (location.protocol === "file:") return;  // index.html says how to serve the page
  setState("loading", "Loading the model\u2026");
  const info = await (await fetch("model.json")).json();
  document.title = `${info.name}: char_lstm in your browser`;
  $("name").textContent = info.name;
  showFacts(info.facts);
  $("prompt").value = info.prompt;
  $("length").value = info.generation.max_new_tokens;
  $("temperature").value = info.generation.temperature;
  $("top_p").value = info.generation.top_p;
  $("greedy").checked = !info.generation.do_sample;
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
      setState("error", error.message, true);
    } finally {
      run = null;
    }
  });
  setState("ready", `Ready: ${info.name} runs in this page.`);
}

main().catch((error) => {
  setState("error", `The model could not be loaded: ${error.message}`, true);
  console.error(error);
});
