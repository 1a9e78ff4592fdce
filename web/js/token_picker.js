// Token picker for Attention Text Encode (AttnGuideTextEncode).
//
// Shows the prompt's tokens as the model's text sequence holds them (the pack's POST /attn_guide/tokenize,
// which tokenizes with ComfyUI's shipped tokenizer of the node's CLIP family: the picker sends the loader
// its clip input comes from): CLIP tokens in 77-token chunks for SD1.x/SD2.x/SDXL, T5 pieces for Flux.1
// and Chroma, CLIP chunks then T5 pieces for SD3/SD3.5. It lets the user click words into the `subjects`
// widget: a click makes a word a subject (a noun); shift+click, or the "+ attribute" button, attaches
// the word to a noun as its attribute, so that "red" attached to "car" writes the entry "red car". The
// choice lives in `subjects`, so it is saved in the workflow and survives a reload; the picker itself
// saves nothing. Built with addDOMWidget, so the classic canvas and the Vue node renderer ("Nodes 2.0")
// both show it. An attribute or noun that the node would find elsewhere by its word alone (a word that occurs
// twice: "a red car next to a red bench") is written with the position of its first token, "red@7 bench",
// which the node resolves to that occurrence; the plain words are kept where they resolve to the clicked tokens.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const NODE_ID = "AttnGuideTextEncode";
const WIDGET_NAME = "$$attn_guide_token_picker";
const ROUTE = "/attn_guide/tokenize";
const TYPING_DELAY_MS = 250;
const MIN_HEIGHT = 80;    // px the picker asks of the node at least
const MAX_HEIGHT = 260;   // px it grows to with a long prompt; beyond, it scrolls
const CHROME = 10;        // px of the picker's own padding and border around its content
const ROOM_GAP = 20;      // graph px left between the grown node and a node it moves down
const SETTLE_FRAMES = 8;  // frames to wait for the Vue renderer to resize the node
// One colour per subject, in the order of the `subjects` widget (wraps after eight).
const SUBJECT_COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"];
const SPECIAL_LABELS = { start: "SOT", end: "EOT", padding: "pad", space: "\u2581" };
const T5_LABELS = { end: "EOS" };  // T5's </s>
const SPECIAL_TITLES = { space: "a bare T5 '\u2581' piece: it marks the space before a word and carries no word content" };
// A loader's widgets that tell its CLIP's family (Load CLIP's `type`, a checkpoint's or text encoders' files).
const SOURCE_WIDGETS = /^(type|ckpt_name|clip_name\d*)$/;
const MAX_HOPS = 32;
const INDEX = /^\d+$/;
const ANCHORED = /^(.+)@(\d+)$/;  // 'red@7': the 'red' whose first token is at position 7 (subjects.split_anchor)

// Same split as subjects.parse_subject_spec: commas, semicolons and newlines; empty entries dropped.
export function parseSubjects(spec) {
  return String(spec ?? "").split(/[,;\n]/).map((s) => s.trim()).filter((s) => s.length > 0);
}

// The loader the node's CLIP comes from, for the route to tell its family: {node: class, widgets: {type,
// ckpt_name, clip_name1, ...}}, followed up the clip input through nodes that pass a CLIP on (Load LoRA,
// CLIP Set Last Layer, reroutes); null when the clip input is not linked.
export function clipSource(node) {
  const seen = new Set();
  let current = node;
  for (let hop = 0; hop < MAX_HOPS; hop++) {
    const input = current.inputs?.find((i) => i.name === "clip" || i.type === "CLIP") ??
      (current.type === "Reroute" ? current.inputs?.[0] : undefined);
    if (hop > 0 && !input) return describeLoader(current);
    const graph = current.graph;
    const link = input?.link == null ? null :
      graph?.getLink?.(input.link) ?? graph?.links?.get?.(input.link) ?? graph?.links?.[input.link];
    if (!link) return hop > 0 ? describeLoader(current) : null;
    const origin = graph.getNodeById(link.origin_id);
    if (!origin || seen.has(origin.id)) return null;
    seen.add(origin.id);
    current = origin;
  }
  return null;
}

function describeLoader(node) {
  const widgets = {};
  for (const w of node.widgets ?? []) {
    if (SOURCE_WIDGETS.test(w.name) && typeof w.value === "string") widgets[w.name] = w.value;
  }
  return { node: String(node.comfyClass ?? node.type), widgets };
}

// The status line's count: "10 tokens in 1 chunk of 77" (CLIP), "9 T5 pieces (sequence of 256)", both for SD3.
export function tokenCount(answer) {
  const count = (chunks) => chunks.reduce((n, c) => n + c.tokens.filter((t) => !t.special).length, 0);
  const clip = answer.chunks.filter((c) => (c.encoder ?? "clip") === "clip");
  const t5 = answer.chunks.filter((c) => c.encoder === "t5");
  const parts = [];
  if (clip.length) {
    parts.push(`${count(clip)} ${t5.length ? "CLIP " : ""}tokens in ${clip.length} chunk${clip.length === 1 ? "" : "s"}` +
      ` of ${clip[0].length ?? answer.chunk_length}`);
  }
  if (t5.length) parts.push(`${count(t5)} T5 pieces (sequence of ${t5[0].length})`);
  return parts.join(" + ");
}

// What covers the token at `position` in the route's resolved `subjects`: [{index, role, attribute}],
// role "noun" or "attribute" (attribute: its index among the entry's attributes).
export function coverage(resolved, position) {
  const found = [];
  resolved.forEach((s, index) => {
    if (s.error) return;
    if ((s.noun?.positions ?? s.positions).includes(position)) found.push({ index, role: "noun" });
    (s.attributes ?? []).forEach((a, attribute) => {
      if (a.positions.includes(position)) found.push({ index, role: "attribute", attribute });
    });
  });
  return found;
}

// The new `subjects` value after a click on the token at `position`: a noun's entry is removed, an
// attribute is taken off its noun ("red car" -> "car"); otherwise the token's `pick` (its word, or its
// index for a repeated word) is appended as a new subject.
export function toggleSubject(spec, resolved, position, pick) {
  const entries = parseSubjects(spec);
  const covering = coverage(resolved, position);
  if (covering.length === 0) return [...entries, pick].join(", ");
  const nouns = new Set(covering.filter((c) => c.role === "noun").map((c) => c.index));
  const next = entries.map((entry, index) => {
    if (nouns.has(index)) return null;
    const dropped = new Set(covering.filter((c) => c.index === index && c.role === "attribute")
      .map((c) => c.attribute));
    if (dropped.size === 0) return entry;
    const words = entry.split(/\s+/);
    return [...words.slice(0, -1).filter((_w, i) => !dropped.has(i)), words[words.length - 1]].join(" ");
  });
  return next.filter((e) => e !== null).join(", ");
}

// An entry's word as written: "red@7" -> {word: "red", at: 7}, the occurrence whose first token is at 7;
// "red" -> {word: "red", at: null}, the word where the node finds it by itself.
export function splitAnchor(text) {
  const match = ANCHORED.exec(text);
  return match ? { word: match[1], at: Number(match[2]) } : { word: text, at: null };
}

// The prompt's words by the position of their first token: {word, positions, pick} (the route's word tokens).
export function promptWords(chunks) {
  const words = new Map();
  for (const chunk of chunks ?? []) {
    for (const token of chunk.tokens) {
      if (token.special || !token.word_positions || words.has(token.word_positions[0])) continue;
      words.set(token.word_positions[0], { word: token.word, positions: token.word_positions, pick: token.pick });
    }
  }
  return words;
}

// How an entry names the word whose first token is at `first`: the word itself where the node finds the word
// alone at these tokens (its pick is the word: its first occurrence), else "word@first".
function nameWord(word, first, words) {
  return words.get(first)?.pick?.toLowerCase() === word.toLowerCase() ? word : `${word}@${first}`;
}

// The new `subjects` value after attaching the clicked word `token` ({position, first, word, pick}: the chip's
// position, its word's first token position, the word and the chip's pick) to the noun of entry `index`: the
// entry's words in the prompt's order, the noun last ("car" + "red" -> "red car"). A word that is this noun's
// attribute already is taken off it; one that is another noun's moves here. Returns {spec}, the entry written so
// that it resolves to the clicked tokens ("red@7 bench" where "red" alone names an earlier 'red'), and, where
// the plain words ("red bench") may resolve there too, {plain, check}: the spec with the plain entry, and the
// two entries [plain, explicit] to resolve, so that the caller keeps the plain one when both resolve alike.
// {error} where no entry can say it: the word is a subject's noun, an embedding or a separator, or the noun is
// an index inside a word.
export function attachAttribute(spec, answer, index, token) {
  const resolved = answer.subjects;
  let entries = parseSubjects(spec);
  const target = resolved[index];
  if (!target || target.error || index >= entries.length) return { error: "that subject is gone" };
  const { position, first, word, pick } = token;
  const covering = coverage(resolved, position);
  if (covering.some((c) => c.role === "noun")) {
    return { error: `"${word ?? pick}" is a subject of its own: click it to remove it first` };
  }
  if (covering.some((c) => c.index === index)) return { spec: toggleSubject(spec, resolved, position, pick) };
  const writable = (text) => Boolean(text) && text !== "<embedding>" && !/[,;\s]/.test(text);
  if (!writable(word)) {
    return { error: `"${word ?? pick}" cannot be written as a word of an entry (an embedding or a separator)` };
  }
  const words = promptWords(answer.chunks);
  let noun;
  if (INDEX.test(entries[index])) {  // a noun clicked by its index (a repeated word): name it by its word
    const at = Number(entries[index]);
    const found = words.get(at);
    if (!found || !writable(found.word)) {
      return { error: `"${target.noun?.word ?? entries[index]}" is given by its index (${entries[index]}), which ` +
        `is not a word's first token: an attribute needs the noun as a word` };
    }
    noun = { word: found.word, at };
  } else {
    noun = { word: splitAnchor(entries[index].split(/\s+/).pop()).word, at: target.noun.positions[0] };
  }
  if (covering.length) entries = parseSubjects(toggleSubject(spec, resolved, position, pick));  // off the other noun
  const attributes = entries[index].split(/\s+/).slice(0, -1).map((text, i) =>
    ({ word: splitAnchor(text).word, at: target.attributes?.[i]?.positions[0] ?? -1 }));
  attributes.push({ word, at: first, clicked: true });
  attributes.sort((a, b) => a.at - b.at);
  const ordered = [...attributes, noun];
  const names = ordered.map((w) => nameWord(w.word, w.at, words));
  if (!names.some((name) => ANCHORED.test(name))) {
    // every word at its first occurrence: one anchor makes the node find the words one by one, not as a phrase
    // that may stand elsewhere in the prompt
    const clicked = ordered.findIndex((w) => w.clicked);
    names[clicked] = `${ordered[clicked].word}@${ordered[clicked].at}`;
  }
  const explicit = names.join(" ");
  const plain = ordered.map((w) => w.word).join(" ");
  const write = (entry) => entries.map((e, i) => (i === index ? entry : e)).join(", ");
  return { spec: write(explicit), plain: write(plain), check: [plain, explicit] };
}

// True if two resolved entries cover the same tokens: the noun's and each attribute's, in order.
export function sameTokens(a, b) {
  const tokens = (s) => JSON.stringify([s?.noun?.positions, (s?.attributes ?? []).map((x) => x.positions)]);
  return Boolean(a && b && !a.error && !b.error) && tokens(a) === tokens(b);
}

function injectStyle() {
  if (document.getElementById("attn-guide-token-picker-style")) return;
  const style = document.createElement("style");
  style.id = "attn-guide-token-picker-style";
  style.textContent = `
.attn-guide-token-picker { box-sizing: border-box; width: 100%; height: 100%; max-height: ${MAX_HEIGHT}px; overflow-y: auto;
  overflow-x: hidden; padding: 4px; border-radius: 6px; font: 12px/1.2 sans-serif; color: var(--input-text, #ddd);
  background: var(--comfy-input-bg, #222); border: 1px solid var(--border-color, #444); }
.attn-guide-token-picker .agtp-content { min-width: 0; }
.attn-guide-token-picker .agtp-status { color: var(--descrip-text, #999); margin: 0 2px 3px; overflow-wrap: anywhere; }
.attn-guide-token-picker .agtp-error { color: var(--error-text, #ff6b6b); margin: 2px; overflow: hidden;
  display: -webkit-box; -webkit-box-orient: vertical; -webkit-line-clamp: 2; }
.attn-guide-token-picker .agtp-tools { display: flex; flex-wrap: wrap; gap: 4px; align-items: center; margin: 0 2px 3px;
  color: var(--descrip-text, #999); font-size: 11px; }
.attn-guide-token-picker .agtp-tools button, .attn-guide-token-picker .agtp-tools select { font: inherit; color: inherit;
  padding: 0 4px; border-radius: 4px; border: 1px solid var(--border-color, #555); background: var(--comfy-menu-bg, #333);
  cursor: pointer; max-width: 100%; }
.attn-guide-token-picker .agtp-tools button[aria-pressed=true] { color: #fff; border-color: var(--p-primary-color, #8ab4f8);
  background: var(--p-primary-color, #3b6fd8); }
.attn-guide-token-picker .agtp-chunk { display: flex; flex-wrap: wrap; gap: 3px; align-items: flex-start;
  padding: 3px 0; }
.attn-guide-token-picker .agtp-chunk + .agtp-chunk { border-top: 2px dashed var(--border-color, #555); }
.attn-guide-token-picker .agtp-chunk-label { flex-basis: 100%; color: var(--descrip-text, #999); font-size: 10px; }
.attn-guide-token-picker .agtp-word { display: inline-flex; flex-wrap: wrap; gap: 1px; max-width: 100%; }
.attn-guide-token-picker .agtp-token { display: inline-flex; flex-direction: column; align-items: center;
  min-width: 14px; padding: 1px 4px; border-radius: 4px; border: 1px solid var(--border-color, #555);
  background: var(--comfy-menu-bg, #333); color: inherit; font: inherit; cursor: pointer; overflow-wrap: anywhere; }
.attn-guide-token-picker .agtp-word > .agtp-token:not(:first-child) { border-top-left-radius: 0;
  border-bottom-left-radius: 0; }
.attn-guide-token-picker .agtp-word > .agtp-token:not(:last-child) { border-top-right-radius: 0;
  border-bottom-right-radius: 0; }
.attn-guide-token-picker .agtp-word:hover > .agtp-token { border-color: var(--p-primary-color, #8ab4f8); }
.attn-guide-token-picker .agtp-token sub { font-size: 9px; opacity: 0.6; line-height: 1; white-space: nowrap; }
.attn-guide-token-picker .agtp-token .agtp-role { font-size: 8px; font-weight: bold; letter-spacing: 0.02em;
  text-transform: uppercase; margin-left: 2px; }
.attn-guide-token-picker .agtp-token.agtp-selected { color: #fff; border-color: #fff; }
.attn-guide-token-picker .agtp-token.agtp-selected sub { opacity: 0.85; }
.attn-guide-token-picker .agtp-token.agtp-attribute { border-style: dashed; border-width: 1px; }
.attn-guide-token-picker .agtp-token.agtp-attribute sub { opacity: 0.85; }
.attn-guide-token-picker .agtp-token.agtp-target { box-shadow: 0 0 0 2px var(--p-primary-color, #8ab4f8); }
.attn-guide-token-picker.agtp-armed .agtp-token:not(.agtp-special) { cursor: copy; }
.attn-guide-token-picker .agtp-token.agtp-special { cursor: default; opacity: 0.45; border-style: dashed; }
.attn-guide-token-picker .agtp-token.agtp-space { min-width: 8px; padding: 1px 2px; }
.attn-guide-token-picker .agtp-note { font-size: 11px; }
`;
  document.head.appendChild(style);
}

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

// A node's box in graph coordinates, its title included.
function nodeBox(node) {
  const title = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  const collapsed = node.flags?.collapsed;
  const width = collapsed ? (node._collapsed_width ?? node.size[0]) : node.size[0];
  return { x: node.pos[0], top: node.pos[1] - title, width, bottom: node.pos[1] + (collapsed ? 0 : node.size[1]) };
}

const overlapsX = (a, b) => a.x < b.x + b.width && b.x < a.x + a.width;

// Moves down the nodes that the grown `node` now covers below `from` (graph y of the picker's top edge),
// so that its tokens are not drawn under them, and those nodes' own neighbours below as far as needed:
// a node keeps its distance to the one above it up to ROOM_GAP, a larger distance absorbs the push.
// Nodes beside the node, above the picker, or pinned stay where they are.
function makeRoom(node, from) {
  const others = (node.graph?._nodes ?? node.graph?.nodes ?? []).filter((n) => n !== node && !n.flags?.pinned);
  const grown = nodeBox(node);
  const pushers = [{ ...grown, from, need: () => grown.bottom + ROOM_GAP }];
  let moved = false;
  for (const other of others.map((n) => ({ node: n, box: nodeBox(n) })).sort((a, b) => a.box.top - b.box.top)) {
    const { box } = other;
    let shift = 0;
    for (const p of pushers) {
      if (overlapsX(p, box) && box.top >= p.from) shift = Math.max(shift, p.need(box.top) - box.top);
    }
    if (shift < 0.5) continue;
    other.node.pos = [other.node.pos[0], other.node.pos[1] + shift];  // assigned, so the Vue renderer sees it
    moved = true;
    const bottom = box.bottom + shift;
    pushers.push({ ...box, from: box.bottom, need: (top) => bottom + Math.min(top - box.bottom, ROOM_GAP) });
  }
  if (moved) node.graph?.setDirtyCanvas?.(true, true);
}

class TokenPicker {
  constructor(node) {
    this.node = node;
    this.root = element("div", "attn-guide-token-picker");
    this.root.dataset.testid = "attn-guide-token-picker";
    this.content = element("div", "agtp-content");  // natural height, measured to size the widget
    this.root.append(this.content);
    this.timer = null;
    this.request = 0;     // id of the newest request; older answers are dropped
    this.shown = null;    // the {text, subjects, clip} the current rendering answers
    this.answer = null;
    this.target = null;   // first token position of the noun that shift+click attaches to
    this.armed = false;   // "+ attribute" pressed: the next click attaches to the target noun
    this.notice = null;   // why the last click did nothing, until the next change
    this.settling = 0;    // frames waited for the node to take its new height
    this.content.append(element("div", "agtp-status", "Tokenizing…"));
    // Clicks choose tokens: they must not start a node drag or a canvas pan.
    this.root.addEventListener("pointerdown", (e) => { if (e.target.closest("button, select")) e.stopPropagation(); });
    this.root.addEventListener("click", (e) => this.onClick(e));
    this.root.addEventListener("change", (e) => this.onChange(e));
    this.root.addEventListener("wheel", (e) => {
      if (this.root.scrollHeight > this.root.clientHeight) e.stopPropagation();
    }, { passive: true });
    // The chips wrap to the node's width; when they need more rows, the node grows (and makes room).
    this.observer = new ResizeObserver(() => this.settle());
    this.observer.observe(this.content);
  }

  widget(name) {
    return this.node.widgets?.find((w) => w.name === name);
  }

  values() {
    return { text: String(this.widget("text")?.value ?? ""), subjects: String(this.widget("subjects")?.value ?? ""),
      clip: clipSource(this.node) };
  }

  schedule(delay = TYPING_DELAY_MS) {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.refresh(), delay);
  }

  dispose() {
    clearTimeout(this.timer);
    this.observer.disconnect();
    this.request += 1;
  }

  // The route's answer for {text, subjects, clip}; throws with the route's message.
  async ask(values) {
    const response = await api.fetchApi(ROUTE, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(values),
    });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer?.error ?? `${response.status} ${response.statusText}`);
    return answer;
  }

  async refresh() {
    const values = this.values();
    const id = ++this.request;  // also voids an answer still on its way for values since changed back
    if (this.shown && this.shown.text === values.text && this.shown.subjects === values.subjects &&
        JSON.stringify(this.shown.clip) === JSON.stringify(values.clip)) return;
    let answer;
    try {
      answer = await this.ask(values);
    } catch (error) {
      if (id === this.request) this.renderError(`Could not tokenize: ${error.message ?? error}`);
      return;
    }
    if (id !== this.request) return;
    if (answer.error) {  // a CLIP of a family the pack does not read
      this.shown = values;
      this.answer = null;
      this.renderError(answer.error);
      return;
    }
    if (this.shown?.text !== values.text) this.notice = null;
    this.shown = values;
    this.answer = answer;
    this.render();
  }

  setSubjects(next) {
    const subjects = this.widget("subjects");
    if (!subjects) return;
    subjects.value = next;
    subjects.callback?.(next);
    this.node.setDirtyCanvas?.(true, true);
    this.schedule(0);
  }

  onClick(event) {
    if (event.target.closest("button[data-action=attach]")) {
      event.preventDefault();
      event.stopPropagation();
      this.armed = !this.armed;
      this.notice = null;
      if (this.answer) this.render();
      return;
    }
    const button = event.target.closest("button[data-position]");
    if (!button || !this.answer) return;
    event.preventDefault();
    event.stopPropagation();
    const subjects = this.widget("subjects");
    if (!subjects) return;
    const position = Number(button.dataset.position);
    const { pick } = button.dataset;
    const target = this.targetIndex();
    const attach = (event.shiftKey || this.armed) && target !== null;
    this.armed = false;
    this.notice = null;
    if (attach) {
      const token = { position, first: Number(button.dataset.word), word: button.dataset.wordText, pick };
      const result = attachAttribute(subjects.value, this.answer, target, token);
      if (result.error) {
        this.notice = `Cannot attach: ${result.error}.`;
        this.render();
        return;
      }
      this.attach(result);
      return;
    }
    const next = toggleSubject(subjects.value, this.answer.subjects, position, pick);
    if (coverage(this.answer.subjects, position).length === 0) this.target = Number(button.dataset.word);
    this.setSubjects(next);
  }

  // Writes an attach's entry: the plain words where the route resolves them to the same tokens as the entry
  // that names each word's occurrence, else that entry. Dropped if `subjects` changed meanwhile.
  async attach(result) {
    const before = this.values();
    let spec = result.spec;
    if (result.check) {
      try {
        const [plain, explicit] = (await this.ask({ ...before, subjects: result.check.join("\n") })).subjects;
        if (sameTokens(plain, explicit)) spec = result.plain;
      } catch (error) {
        // the explicit entry is right in any case
      }
    }
    if (this.values().subjects !== before.subjects) return;
    this.setSubjects(spec);
  }

  onChange(event) {
    if (!event.target.matches("select[data-action=target]")) return;
    event.stopPropagation();
    this.target = Number(event.target.value);
    this.render();
  }

  // Index in the resolved subjects of the noun that attributes attach to: the one last added or chosen,
  // else the last subject; null when there is none.
  targetIndex() {
    const subjects = this.answer?.subjects ?? [];
    const index = subjects.findIndex((s) => !s.error && s.noun?.positions.includes(this.target));
    if (index >= 0) return index;
    for (let i = subjects.length - 1; i >= 0; i--) if (!subjects[i].error) return i;
    return null;
  }

  renderError(message) {
    this.content.replaceChildren(element("div", "agtp-error", message));
  }

  render() {
    const { chunks, subjects } = this.answer;
    const roles = new Map();  // position -> {index, role} of the first subject covering it
    subjects.forEach((s, index) => {
      if (s.error) return;
      for (const p of s.noun?.positions ?? s.positions) if (!roles.has(p)) roles.set(p, { index, role: "noun" });
      for (const a of s.attributes ?? []) {
        for (const p of a.positions) if (!roles.has(p)) roles.set(p, { index, role: "attribute", noun: s.noun?.word });
      }
    });
    const target = this.targetIndex();
    if (target === null) this.armed = false;
    this.root.classList.toggle("agtp-armed", this.armed);
    const parts = [];
    const textInput = this.node.inputs?.find((input) => input.name === "text");
    if (textInput?.link != null) {
      parts.push(element("div", "agtp-error", "text comes from a link: the picker shows the text widget's value, " +
        "not the linked one"));
    }
    const where = (word, positions) => `${word} ${positions.join(" ")}`;
    const chosen = subjects.filter((s) => !s.error).map((s) => (s.attributes ?? []).length === 0 ?
      `${s.entry} (${s.positions.join(" ")})` :
      `${s.entry} (${[where(s.noun.word, s.positions), ...s.attributes.map((a) => where(a.word, a.positions))].join(" · ")})`);
    const family = this.answer.family && this.answer.family !== "clip" ? `${this.answer.family_name}: ` : "";
    parts.push(element("div", "agtp-status", `${family}${tokenCount(this.answer)} · ` +
      (chosen.length ? `subjects: ${chosen.join(", ")}` : "click a word to make it a subject")));
    if (this.answer.note) parts.push(element("div", "agtp-status agtp-note", this.answer.note));
    if (target !== null) parts.push(this.renderTools(subjects, target));
    if (this.notice) parts.push(element("div", "agtp-error agtp-notice", this.notice));
    for (const s of subjects.filter((s) => s.error)) {
      const error = element("div", "agtp-error", s.error);
      error.title = s.error;  // two lines show; the whole message (with the prompt's words) on hover
      parts.push(error);
    }
    const targetNoun = target === null ? null : subjects[target].noun?.positions ?? [];
    const labelled = chunks.length > 1;  // one chunk (or one T5 sequence): the status line says what it is
    for (const chunk of chunks) parts.push(this.renderChunk(chunk, labelled, roles, targetNoun));
    this.content.replaceChildren(...parts);
    this.settle();
  }

  // "+ attribute" (attach the next clicked word) to [noun ▾], and the shift+click hint.
  renderTools(subjects, target) {
    const tools = element("div", "agtp-tools");
    const attach = element("button", "", "+ attribute");
    attach.type = "button";
    attach.dataset.action = "attach";
    attach.setAttribute("aria-pressed", String(this.armed));
    attach.title = "Attach the next word you click to this noun as its attribute (\"red\" + \"car\" = \"red car\")";
    const select = element("select");
    select.dataset.action = "target";
    select.title = "The noun that attributes attach to";
    subjects.forEach((s, index) => {
      if (s.error) return;
      const option = element("option", "", `${s.noun?.word ?? s.entry} (${s.positions[0]})`);
      option.value = String(s.noun?.positions[0] ?? s.positions[0]);
      option.selected = index === target;
      select.append(option);
    });
    const noun = subjects[target].noun?.word ?? subjects[target].entry;
    const hint = this.armed ? `now click the word to attach to "${noun}"` : "or shift+click a word";
    tools.append(attach, element("span", "", "to"), select, element("span", "agtp-hint", hint));
    return tools;
  }

  // The height the content wants, within [MIN_HEIGHT, MAX_HEIGHT], plus (classic canvas) the widget's
  // margins: the canvas gives a DOM widget its computed height less a margin above and below.
  wantedHeight() {
    const height = Math.min(MAX_HEIGHT, Math.max(MIN_HEIGHT, this.content.offsetHeight + CHROME));
    return globalThis.LiteGraph?.vueNodesMode ? height : height + 2 * (this.domWidget?.margin ?? 0);
  }

  // Classic canvas: grow the node when the tokens need more room (never shrink what the user sized), and
  // redraw it in any case: the canvas shares the node's height out among its widgets when it draws it, so a
  // node tall enough already (loaded from a workflow) must be drawn again to give the picker its new height.
  // The Vue renderer lays the node out around the element by itself.
  fitNode() {
    if (globalThis.LiteGraph?.vueNodesMode || !this.node.computeSize) return;
    const wanted = this.node.computeSize()[1];
    if (wanted > this.node.size[1]) this.node.setSize([this.node.size[0], wanted]);
    this.node.setDirtyCanvas?.(true, true);
  }

  // After the content changed size: fit the node, wait until its height holds still (the Vue renderer
  // resizes it a frame or two later), then move down what the node now covers.
  settle() {
    if (this.settling) return;
    this.settling = 1;
    let height = null;
    const step = () => {
      this.fitNode();
      const now = this.node.size?.[1];
      if (now !== height && this.settling < SETTLE_FRAMES) {
        height = now;
        this.settling += 1;
        requestAnimationFrame(step);
        return;
      }
      this.settling = 0;
      if (!this.node.graph || this.content.offsetHeight === 0) return;  // hidden: collapsed, zoomed out, off screen
      makeRoom(this.node, this.node.pos[1] + (this.domWidget?.y ?? 0));
    };
    requestAnimationFrame(step);
  }

  renderChunk(chunk, labelled, roles, targetNoun) {
    const box = element("div", "agtp-chunk");
    box.dataset.chunk = chunk.index;
    const t5 = chunk.encoder === "t5";
    box.dataset.encoder = t5 ? "t5" : "clip";
    const first = chunk.tokens[0].position;
    if (labelled) {
      const clipIndex = this.answer.chunks.filter((c) => c.encoder !== "t5").indexOf(chunk);
      const name = t5 ? "T5" : this.answer.chunks.some((c) => c.encoder === "t5") ? `CLIP chunk ${clipIndex + 1}` :
        `chunk ${chunk.index + 1}`;
      box.append(element("div", "agtp-chunk-label",
        `${name} · positions ${first}–${first + chunk.tokens.length - 1}`));
    }
    let word = null;
    const padding = chunk.tokens.filter((t) => t.kind === "padding");
    for (const token of chunk.tokens) {
      if (token.kind === "padding") continue;
      if (token.special) {
        word = null;
        const label = (t5 ? T5_LABELS[token.kind] : undefined) ?? SPECIAL_LABELS[token.kind];
        box.append(this.specialChip(token.kind, token.position, SPECIAL_TITLES[token.kind] ?? token.piece ?? token.text,
          label));
        continue;
      }
      if (!word || word.dataset.first !== String(token.word_positions[0])) {
        word = element("span", "agtp-word");
        word.dataset.first = token.word_positions[0];
        box.append(word);
      }
      word.append(this.tokenButton(token, roles.get(token.position), targetNoun?.includes(token.position)));
    }
    if (padding.length) {
      const last = padding[padding.length - 1].position;
      const what = padding[0].text === chunk.tokens.find((t) => t.kind === "end")?.text ? "the end token repeated" :
        `"${padding[0].piece ?? padding[0].text}"`;
      box.append(this.specialChip("padding", `${padding[0].position}–${last}`,
        `${padding.length} padding tokens (${what})`, `pad ×${padding.length}`));
    }
    return box;
  }

  specialChip(kind, position, title, label) {
    const chip = element("span", `agtp-token agtp-special agtp-${kind}`);
    chip.append(document.createTextNode(label ?? SPECIAL_LABELS[kind] ?? kind), element("sub", "", String(position)));
    chip.title = `${title} · position ${position} · not selectable`;
    chip.setAttribute("aria-disabled", "true");
    return chip;
  }

  tokenButton(token, role, isTarget) {
    const button = element("button", "agtp-token");
    button.type = "button";
    button.dataset.position = token.position;
    button.dataset.pick = token.pick;
    button.dataset.word = token.word_positions[0];
    button.dataset.wordText = token.word;
    const sub = element("sub", "", String(token.position));
    button.append(document.createTextNode(token.text), sub);
    const pieces = token.word_positions.length > 1 ? ` (word "${token.word}", tokens ${token.word_positions.join(" ")})` : "";
    const piece = token.piece !== undefined ? ` · T5 piece "${token.piece}"` : "";
    const about = `"${token.text}" · position ${token.position}${piece}${pieces}`;
    if (!role) {
      button.setAttribute("aria-pressed", "false");
      button.title = `${about} · click: add to subjects as "${token.pick}" · shift+click: attach to the chosen noun`;
      return button;
    }
    const color = SUBJECT_COLORS[role.index % SUBJECT_COLORS.length];
    button.dataset.role = role.role;
    button.dataset.subject = role.index;
    button.setAttribute("aria-pressed", "true");
    if (role.role === "noun") {
      button.classList.add("agtp-selected", "agtp-noun");
      button.classList.toggle("agtp-target", Boolean(isTarget));
      button.style.background = color;
      sub.append(element("span", "agtp-role", "noun"));
      button.title = `${about} · noun of subject ${role.index + 1} · click: remove from subjects`;
    } else {
      button.classList.add("agtp-attribute");
      button.style.borderColor = color;
      button.style.background = `${color}59`;  // the noun's colour, lighter: the same subject, another role
      sub.append(element("span", "agtp-role", "attr"));
      button.title = `${about} · attribute of "${role.noun}" (subject ${role.index + 1}) · click: detach it`;
    }
    return button;
  }
}

function chainCallback(object, property, callback) {
  const original = object[property];
  object[property] = function (...args) {
    const result = original?.apply(this, args);
    callback.apply(this, args);
    return result;
  };
}

function attachPicker(node) {
  if (node.widgets?.some((w) => w.name === WIDGET_NAME)) return;
  injectStyle();
  const picker = new TokenPicker(node);
  const widget = node.addDOMWidget(WIDGET_NAME, "attn_guide_token_picker", picker.root, {
    serialize: false,          // not a node input: nothing goes into the prompt
    hideOnZoom: true,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => picker.wantedHeight(),
    getMaxHeight: () => picker.wantedHeight(),
  });
  widget.serialize = false;  // nor into the workflow: the choice lives in `subjects`
  widget.label = "CLIP tokens";
  // The picker always spans its node. The side panel (Parameters) draws a widget it has no editor for
  // into its own canvas and leaves that canvas's width on the widget, and the canvas then sized the
  // picker to the panel's width (about two thirds of the node's).
  Object.defineProperty(widget, "width", { configurable: true, enumerable: true, get: () => undefined, set: () => {} });
  picker.domWidget = widget;
  chainCallback(widget, "onRemove", () => picker.dispose());
  node.attnGuideTokenPicker = picker;
  for (const name of ["text", "subjects"]) {
    const target = node.widgets?.find((w) => w.name === name);
    if (target) chainCallback(target, "callback", () => picker.schedule());
  }
  chainCallback(node, "onConfigure", () => picker.schedule(0));  // loaded from a workflow, undo, paste
  chainCallback(node, "onConnectionsChange", () => picker.answer && picker.render());  // text linked or not
  picker.schedule(0);
}

// Any node's change that can change where a picker's CLIP comes from (a link, a loader's type or file) asks the
// pickers to look again; one whose CLIP source, text and subjects are unchanged sends no request.
function watchClipSources(node) {
  const refresh = () => {
    for (const other of node.graph?._nodes ?? node.graph?.nodes ?? []) other.attnGuideTokenPicker?.schedule(0);
  };
  chainCallback(node, "onConnectionsChange", refresh);
  for (const widget of node.widgets ?? []) {
    if (SOURCE_WIDGETS.test(widget.name)) chainCallback(widget, "callback", refresh);
  }
}

app.registerExtension({
  name: "AttentionGuidance.TokenPicker",
  nodeCreated(node) {
    if (node.comfyClass === NODE_ID) attachPicker(node);
    watchClipSources(node);
  },
  loadedGraphNode(node) {
    if (node.comfyClass === NODE_ID) node.attnGuideTokenPicker?.schedule(0);
  },
});
