// The page's arithmetic, apart from the page and the runtime (no DOM, no ONNX Runtime): the tokenizer, choosing the
// next character, and the text as it is shown. app.js imports it; tests/scripts/test_web_page.py checks it in Node
// against CharLSTMTokenizer, transformers' sampling and char_lstm.terminal.visible_controls.

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

export class VisibleText {
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

export function visible(text) {
  const shown = new VisibleText();
  return shown.push(text) + shown.end();
}

// ---------------------------------------------------------------------------------------------------------------------
// The tokenizer: one token per Unicode code point, as CharLSTMTokenizer encodes (its special tokens, typed as they
// are written, are one token each); a character outside the vocabulary is the unknown token.

export class Tokenizer {
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
// Choosing the next character: the likeliest (greedy, the first of equal ones, as torch.argmax), or a draw from the
// softmax of logits / temperature, kept to the smallest set of likeliest characters whose probability reaches top-p
// (transformers' TopPLogitsWarper), with a seeded generator: the same seed gives the same text.

export function seededRandom(seed) {  // mulberry32: a uniform number in [0, 1) per call
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function argmax(logits) {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  return best;
}

export function sample(logits, temperature, topP, random) {
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
