// Token picker for Attention Text Encode (AttnGuideTextEncode).
//
// Shows the prompt's CLIP tokens as the encoder sees them (the pack's POST /attn_guide/tokenize, which
// tokenizes with ComfyUI's shipped tokenizer) and lets the user click words into the `subjects`
// widget. The choice lives in `subjects`, so it is saved in the workflow and survives a reload; the
// picker itself saves nothing. Built with addDOMWidget, so the classic canvas and the Vue node
// renderer ("Nodes 2.0") both show it.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const NODE_ID = "AttnGuideTextEncode";
const WIDGET_NAME = "$$attn_guide_token_picker";
const ROUTE = "/attn_guide/tokenize";
const TYPING_DELAY_MS = 250;
const MIN_HEIGHT = 80;    // px the picker asks of the node at least
const MAX_HEIGHT = 260;   // px it grows to with a long prompt; beyond, it scrolls
// One colour per subject, in the order of the `subjects` widget (wraps after eight).
const SUBJECT_COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"];
const SPECIAL_LABELS = { start: "SOT", end: "EOT", padding: "pad" };

// Same split as subjects.parse_subject_spec: commas, semicolons and newlines; empty entries dropped.
export function parseSubjects(spec) {
  return String(spec ?? "").split(/[,;\n]/).map((s) => s.trim()).filter((s) => s.length > 0);
}

// The new `subjects` value after a click on the token at `position`: entries that already cover it are
// removed; otherwise the token's `pick` (its word, or its index for a repeated word) is appended.
export function toggleSubject(spec, resolved, position, pick) {
  const entries = parseSubjects(spec);
  const covering = new Set(resolved.filter((s) => s.positions.includes(position)).map((s) => s.entry));
  if (covering.size > 0) return entries.filter((e) => !covering.has(e)).join(", ");
  return [...entries, pick].join(", ");
}

function injectStyle() {
  if (document.getElementById("attn-guide-token-picker-style")) return;
  const style = document.createElement("style");
  style.id = "attn-guide-token-picker-style";
  style.textContent = `
.attn-guide-token-picker { box-sizing: border-box; width: 100%; height: 100%; max-height: ${MAX_HEIGHT}px; overflow-y: auto;
  padding: 4px; border-radius: 6px; font: 12px/1.2 sans-serif; color: var(--input-text, #ddd);
  background: var(--comfy-input-bg, #222); border: 1px solid var(--border-color, #444); }
.attn-guide-token-picker .agtp-status { color: var(--descrip-text, #999); margin: 0 2px 4px; }
.attn-guide-token-picker .agtp-error { color: var(--error-text, #ff6b6b); margin: 2px; overflow: hidden;
  display: -webkit-box; -webkit-box-orient: vertical; -webkit-line-clamp: 2; }
.attn-guide-token-picker .agtp-chunk { display: flex; flex-wrap: wrap; gap: 3px; align-items: flex-start;
  padding: 3px 0; }
.attn-guide-token-picker .agtp-chunk + .agtp-chunk { border-top: 2px dashed var(--border-color, #555); }
.attn-guide-token-picker .agtp-chunk-label { flex-basis: 100%; color: var(--descrip-text, #999); font-size: 10px; }
.attn-guide-token-picker .agtp-word { display: inline-flex; gap: 1px; }
.attn-guide-token-picker .agtp-token { display: inline-flex; flex-direction: column; align-items: center;
  min-width: 14px; padding: 1px 4px; border-radius: 4px; border: 1px solid var(--border-color, #555);
  background: var(--comfy-menu-bg, #333); color: inherit; font: inherit; cursor: pointer; }
.attn-guide-token-picker .agtp-word > .agtp-token:not(:first-child) { border-top-left-radius: 0;
  border-bottom-left-radius: 0; }
.attn-guide-token-picker .agtp-word > .agtp-token:not(:last-child) { border-top-right-radius: 0;
  border-bottom-right-radius: 0; }
.attn-guide-token-picker .agtp-word:hover > .agtp-token { border-color: var(--p-primary-color, #8ab4f8); }
.attn-guide-token-picker .agtp-token sub { font-size: 9px; opacity: 0.6; line-height: 1; }
.attn-guide-token-picker .agtp-token.agtp-selected { color: #fff; border-color: #fff; }
.attn-guide-token-picker .agtp-token.agtp-special { cursor: default; opacity: 0.45; border-style: dashed; }
`;
  document.head.appendChild(style);
}

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
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
    this.shown = null;    // the {text, subjects} the current rendering answers
    this.answer = null;
    this.content.append(element("div", "agtp-status", "Tokenizing…"));
    // Clicks choose tokens: they must not start a node drag or a canvas pan.
    this.root.addEventListener("pointerdown", (e) => { if (e.target.closest("button")) e.stopPropagation(); });
    this.root.addEventListener("click", (e) => this.onClick(e));
    this.root.addEventListener("wheel", (e) => {
      if (this.root.scrollHeight > this.root.clientHeight) e.stopPropagation();
    }, { passive: true });
  }

  widget(name) {
    return this.node.widgets?.find((w) => w.name === name);
  }

  values() {
    return { text: String(this.widget("text")?.value ?? ""), subjects: String(this.widget("subjects")?.value ?? "") };
  }

  schedule(delay = TYPING_DELAY_MS) {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.refresh(), delay);
  }

  dispose() {
    clearTimeout(this.timer);
    this.request += 1;
  }

  async refresh() {
    const values = this.values();
    const id = ++this.request;  // also voids an answer still on its way for values since changed back
    if (this.shown && this.shown.text === values.text && this.shown.subjects === values.subjects) return;
    let answer;
    try {
      const response = await api.fetchApi(ROUTE, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(values),
      });
      answer = await response.json();
      if (!response.ok) throw new Error(answer?.error ?? `${response.status} ${response.statusText}`);
    } catch (error) {
      if (id === this.request) this.renderError(`Could not tokenize: ${error.message ?? error}`);
      return;
    }
    if (id !== this.request) return;
    this.shown = values;
    this.answer = answer;
    this.render();
  }

  onClick(event) {
    const button = event.target.closest("button[data-position]");
    if (!button || !this.answer) return;
    event.preventDefault();
    event.stopPropagation();
    const subjects = this.widget("subjects");
    if (!subjects) return;
    const next = toggleSubject(subjects.value, this.answer.subjects, Number(button.dataset.position),
      button.dataset.pick);
    subjects.value = next;
    subjects.callback?.(next);
    this.node.setDirtyCanvas?.(true, true);
    this.schedule(0);
  }

  renderError(message) {
    this.content.replaceChildren(element("div", "agtp-error", message));
  }

  render() {
    const { chunks, subjects } = this.answer;
    const colorOf = new Map();  // position -> colour of the first subject covering it
    subjects.forEach((s, i) => s.positions.forEach((p) => {
      if (!colorOf.has(p)) colorOf.set(p, SUBJECT_COLORS[i % SUBJECT_COLORS.length]);
    }));
    const content = chunks.reduce((n, c) => n + c.tokens.filter((t) => !t.special).length, 0);
    const parts = [];
    const textInput = this.node.inputs?.find((input) => input.name === "text");
    if (textInput?.link != null) {
      parts.push(element("div", "agtp-error", "text comes from a link: the picker shows the text widget's value, " +
        "not the linked one"));
    }
    const chosen = subjects.filter((s) => !s.error).map((s) => `${s.entry} (${s.positions.join(" ")})`);
    parts.push(element("div", "agtp-status", `${content} tokens in ${chunks.length} chunk` +
      `${chunks.length === 1 ? "" : "s"} of ${this.answer.chunk_length} · ` +
      (chosen.length ? `subjects: ${chosen.join(", ")}` : "click a word to make it a subject")));
    for (const s of subjects.filter((s) => s.error)) {
      const error = element("div", "agtp-error", s.error);
      error.title = s.error;  // two lines show; the whole message (with the prompt's words) on hover
      parts.push(error);
    }
    for (const chunk of chunks) parts.push(this.renderChunk(chunk, colorOf));
    this.content.replaceChildren(...parts);
    this.fitNode();
  }

  // The height the content wants, within [MIN_HEIGHT, MAX_HEIGHT].
  wantedHeight() {
    return Math.min(MAX_HEIGHT, Math.max(MIN_HEIGHT, this.content.offsetHeight + 10));  // + padding, border
  }

  // Classic canvas: grow the node when the tokens need more room (never shrink what the user sized).
  // The Vue renderer lays the node out around the element by itself.
  fitNode() {
    if (globalThis.LiteGraph?.vueNodesMode || !this.node.computeSize) return;
    const wanted = this.node.computeSize()[1];
    if (wanted > this.node.size[1]) {
      this.node.setSize([this.node.size[0], wanted]);
      this.node.setDirtyCanvas?.(true, true);
    }
  }

  renderChunk(chunk, colorOf) {
    const box = element("div", "agtp-chunk");
    box.dataset.chunk = chunk.index;
    const first = chunk.tokens[0].position;
    box.append(element("div", "agtp-chunk-label",
      `chunk ${chunk.index + 1} · positions ${first}–${first + chunk.tokens.length - 1}`));
    let word = null;
    const padding = chunk.tokens.filter((t) => t.kind === "padding");
    for (const token of chunk.tokens) {
      if (token.kind === "padding") continue;
      if (token.special) {
        word = null;
        box.append(this.specialChip(token.kind, token.position, token.text));
        continue;
      }
      if (!word || word.dataset.first !== String(token.word_positions[0])) {
        word = element("span", "agtp-word");
        word.dataset.first = token.word_positions[0];
        box.append(word);
      }
      word.append(this.tokenButton(token, colorOf.get(token.position)));
    }
    if (padding.length) {
      const last = padding[padding.length - 1].position;
      box.append(this.specialChip("padding", `${padding[0].position}–${last}`,
        `${padding.length} padding tokens (the end token repeated)`, `pad ×${padding.length}`));
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

  tokenButton(token, color) {
    const button = element("button", "agtp-token");
    button.type = "button";
    button.dataset.position = token.position;
    button.dataset.pick = token.pick;
    button.append(document.createTextNode(token.text), element("sub", "", String(token.position)));
    const pieces = token.word_positions.length > 1 ? ` (word "${token.word}", tokens ${token.word_positions.join(" ")})` : "";
    button.title = `"${token.text}" · position ${token.position}${pieces} · click: ${color ? "remove from" : "add to"} ` +
      `subjects as "${token.pick}"`;
    if (color) {
      button.classList.add("agtp-selected");
      button.style.background = color;
      button.setAttribute("aria-pressed", "true");
    } else {
      button.setAttribute("aria-pressed", "false");
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
    getMaxHeight: () => MAX_HEIGHT,
  });
  widget.serialize = false;  // nor into the workflow: the choice lives in `subjects`
  widget.label = "CLIP tokens";
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

app.registerExtension({
  name: "AttentionGuidance.TokenPicker",
  nodeCreated(node) {
    if (node.comfyClass === NODE_ID) attachPicker(node);
  },
  loadedGraphNode(node) {
    if (node.comfyClass === NODE_ID) node.attnGuideTokenPicker?.schedule(0);
  },
});
