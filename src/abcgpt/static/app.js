// abcgpt web page: the dial, streaming generation, the sweep and "which source?". Plain ES2020, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = ["#4f7cff", "#e0607e", "#2fb38a", "#f0a33a", "#9b6cf0", "#38b2d6", "#c98a4b", "#7a8599"];
const DEBOUNCE_MS = 300;
const MODE_HINTS = {  // what the dial does between corners (GET /api/info's modes)
  mixture: "each sample is one source's text, the source picked with the dial's odds",
  switch: "a blend: the source may change at each turn (a line or sentence)",
  tokens: "every token from a fresh draw of the source, with the dial's odds",
  product: "a product of experts: the sources' next-token logits interpolated",
  gates: "the network's own gates at the dial (untrained between corners unless trained with method=reference)",
};

const state = {
  info: null,
  sources: [],
  dial: 0.5,        // a number with two sources, {name: weight} with more
  picks: null,      // four or more sources: [{name, weight}] picked by name; [] = every source equally
  gen: null,        // {ctrl, n, t0} of the streaming generation in flight
  sweep: null,      // AbortController of the sweep in flight
  attr: null,       // AbortController of the attribution in flight
  timer: null,      // debounce timer of the dial
};

// ---------------------------------------------------------------- small helpers

const fmt = (x) => Number(x).toFixed(2);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};
const svgEl = (tag, attrs) => {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
};

function setStatus(text, kind = "", id = "status") {
  const s = $(id);
  s.textContent = text;
  s.dataset.kind = kind;  // "", "busy", "error", "warn"
}

function humanCount(n) {  // 820000 -> "0.82M", 124439808 -> "124M"
  if (n >= 1e9) return Number((n / 1e9).toPrecision(3)) + "B";
  if (n >= 1e5) return Number((n / 1e6).toPrecision(3)) + "M";
  if (n >= 1e3) return Number((n / 1e3).toPrecision(3)) + "k";
  return String(n);
}

// The dial as normalised weights {name: w}, or null when every weight is 0.
function weightsOf(dial) {
  const s = state.sources;
  if (typeof dial === "number") return { [s[0]]: 1 - dial, [s[1]]: dial };
  const total = s.reduce((t, k) => t + Math.max(0, dial[k] || 0), 0);
  if (!(total > 0)) return null;
  return Object.fromEntries(s.map((k) => [k, Math.max(0, dial[k] || 0) / total]));
}

// "tinystories 0.70 · shakespeare 0.30"; compact: without the sources at 0, and with many sources a summary
// ("uniform over 100 sources", or the largest weights and "+ 12 more").
const COMPACT_MAX = 6;
function describe(w, compact = false) {
  if (!w) return "";
  if (typeof w === "number") w = weightsOf(w);
  let items = Object.entries(w).filter(([, v]) => !compact || v >= 0.005);
  if (compact && items.length > COMPACT_MAX) {
    const vs = items.map(([, v]) => v);
    if (Math.max(...vs) - Math.min(...vs) < 0.0005) return `uniform over ${items.length} sources, ${fmt(vs[0])} each`;
    items = items.sort((a, b) => b[1] - a[1]);
    const more = items.length - (COMPACT_MAX - 1);
    items = items.slice(0, COMPACT_MAX - 1);
    return items.map(([k, v]) => `${k} ${fmt(v)}`).join(" · ") + ` · + ${more} more`;
  }
  return items.map(([k, v]) => `${k} ${fmt(v)}`).join(" · ");
}

// ---------------------------------------------------------------- dial controls

function buildDial() {
  const box = $("dial-box");
  box.textContent = "";
  const s = state.sources;
  if (s.length === 2) buildSlider(box, s);
  else if (s.length === 3) buildTriangle(box, s);
  else buildPicker(box, s);
  updateReadout();
}

function dialMoved() {
  updateReadout();
  clearTimeout(state.timer);
  if (!weightsOf(state.dial)) return;  // all weights 0: nothing to generate
  state.timer = setTimeout(generate, DEBOUNCE_MS);
}

function updateReadout() {
  const w = weightsOf(state.dial);
  const out = $("dial-readout");
  out.textContent = "";
  if (!w) out.textContent = "all weights are 0: raise at least one";
  else if (typeof state.dial === "number") out.append(el("strong", "", fmt(state.dial)), ` → ${describe(w)}`);
  else if (state.picks && !state.picks.length) {
    out.textContent = `uniform: all ${state.sources.length} sources equally (add sources to mix only those)`;
  } else if (state.picks) {  // in the order they were picked
    out.textContent = describe(Object.fromEntries(state.picks.map((p) => [p.name, w[p.name]])), true);
  } else out.textContent = describe(w);
}

// The dial a request sends: the slider's number and the triangle's point as they are; with four or more sources
// the normalised weights of the sources in the mix ({name: w}, summing to 1; every source when none is picked).
function dialToSend() {
  if (!state.picks) return state.dial;
  const w = weightsOf(state.dial);  // every weight 0: sent as it is, for the server to say so
  return w ? Object.fromEntries(Object.entries(w).filter(([, v]) => v > 0)) : state.dial;
}

function buildSlider(box, [a, b]) {
  box.classList.add("two");
  const ends = el("div", "ends");
  const la = el("label", "end", a);
  const lb = el("label", "end", b);
  la.htmlFor = lb.htmlFor = "dial";
  la.style.color = COLORS[0];
  lb.style.color = COLORS[1];
  ends.append(la, lb);
  const input = el("input");
  Object.assign(input, { type: "range", id: "dial", min: "0", max: "1", step: "0.01", value: String(state.dial) });
  input.style.setProperty("--a", COLORS[0]);
  input.style.setProperty("--b", COLORS[1]);
  input.setAttribute("aria-label", `dial from ${a} (0) to ${b} (1)`);
  input.addEventListener("input", () => {
    state.dial = Number(input.value);
    input.setAttribute("aria-valuetext", describe(state.dial));
    dialMoved();
  });
  box.append(ends, input);
}

// Triangle corners in SVG units: top, bottom left, bottom right (one per source, in order).
const TRI = [{ x: 150, y: 30 }, { x: 28, y: 241 }, { x: 272, y: 241 }];

function bary(p) {
  const [a, b, c] = TRI;
  const det = (b.y - c.y) * (a.x - c.x) + (c.x - b.x) * (a.y - c.y);
  const l0 = ((b.y - c.y) * (p.x - c.x) + (c.x - b.x) * (p.y - c.y)) / det;
  const l1 = ((c.y - a.y) * (p.x - c.x) + (a.x - c.x) * (p.y - c.y)) / det;
  return [l0, l1, 1 - l0 - l1];
}

function clampToTriangle(p) {
  if (bary(p).every((l) => l >= 0)) return p;
  let best = p, bestD = Infinity;
  for (let i = 0; i < 3; i++) {  // closest point on each edge
    const a = TRI[i], b = TRI[(i + 1) % 3];
    const dx = b.x - a.x, dy = b.y - a.y;
    const t = Math.min(1, Math.max(0, ((p.x - a.x) * dx + (p.y - a.y) * dy) / (dx * dx + dy * dy)));
    const q = { x: a.x + t * dx, y: a.y + t * dy };
    const d = (q.x - p.x) ** 2 + (q.y - p.y) ** 2;
    if (d < bestD) { bestD = d; best = q; }
  }
  return best;
}

function buildTriangle(box, names) {
  box.classList.add("three");
  const svg = svgEl("svg", {
    id: "dial-triangle", viewBox: "0 0 300 272", tabindex: "0", role: "group",
    "aria-label": "dial: drag the point, or use the arrow keys (Home: centre)",
    "aria-describedby": "dial-readout",
  });
  const pts = TRI.map((p) => `${p.x},${p.y}`).join(" ");
  svg.append(svgEl("polygon", { points: pts, class: "tri-face" }));
  const defs = svgEl("defs");
  names.forEach((_, i) => {  // each corner tinted with its source's colour
    const g = svgEl("radialGradient", { id: `tri-tint-${i}`, gradientUnits: "userSpaceOnUse",
      cx: TRI[i].x, cy: TRI[i].y, r: 190 });
    g.append(svgEl("stop", { offset: "0", "stop-color": COLORS[i], "stop-opacity": "0.28" }),
      svgEl("stop", { offset: "1", "stop-color": COLORS[i], "stop-opacity": "0" }));
    defs.append(g);
    svg.append(svgEl("polygon", { points: pts, fill: `url(#tri-tint-${i})` }));
  });
  svg.prepend(defs);
  for (let i = 0; i < 3; i++) {  // faint iso-weight lines at 0.25, 0.5, 0.75
    const v = TRI[i], u = TRI[(i + 1) % 3], w = TRI[(i + 2) % 3];
    for (const k of [0.25, 0.5, 0.75]) {
      svg.append(svgEl("line", {
        x1: k * v.x + (1 - k) * u.x, y1: k * v.y + (1 - k) * u.y,
        x2: k * v.x + (1 - k) * w.x, y2: k * v.y + (1 - k) * w.y, class: "tri-grid",
      }));
    }
  }
  svg.append(svgEl("polygon", { points: pts, class: "tri-edge" }));
  const labelPos = [
    { x: 150, y: 16, anchor: "middle" }, { x: 6, y: 264, anchor: "start" }, { x: 294, y: 264, anchor: "end" },
  ];
  names.forEach((name, i) => {
    svg.append(svgEl("circle", { cx: TRI[i].x, cy: TRI[i].y, r: 6, fill: COLORS[i], class: "tri-corner" }));
    const t = svgEl("text", { x: labelPos[i].x, y: labelPos[i].y, "text-anchor": labelPos[i].anchor, fill: COLORS[i],
      class: "tri-label" });
    t.textContent = name;
    svg.append(t);
  });
  const halo = svgEl("circle", { r: 16, class: "tri-halo" });
  const dot = svgEl("circle", { r: 8, class: "tri-point" });
  svg.append(halo, dot);

  const centre = { x: (TRI[0].x + TRI[1].x + TRI[2].x) / 3, y: (TRI[0].y + TRI[1].y + TRI[2].y) / 3 };
  let point = centre;
  const place = (p, fire = true) => {
    point = clampToTriangle(p);
    for (const c of [halo, dot]) { c.setAttribute("cx", point.x); c.setAttribute("cy", point.y); }
    const l = bary(point).map((x) => Math.round(Math.max(0, x) * 1000) / 1000);
    state.dial = Object.fromEntries(names.map((n, i) => [n, l[i]]));
    if (fire) dialMoved();
  };
  const toSvg = (ev) => {
    const m = svg.getScreenCTM().inverse();
    const q = new DOMPoint(ev.clientX, ev.clientY).matrixTransform(m);
    return { x: q.x, y: q.y };
  };
  svg.addEventListener("pointerdown", (ev) => {
    svg.setPointerCapture(ev.pointerId);
    svg.focus();
    svg.classList.add("dragging");
    place(toSvg(ev));
    ev.preventDefault();
  });
  svg.addEventListener("pointermove", (ev) => { if (svg.hasPointerCapture(ev.pointerId)) place(toSvg(ev)); });
  const release = () => svg.classList.remove("dragging");
  svg.addEventListener("pointerup", release);
  svg.addEventListener("pointercancel", release);
  svg.addEventListener("keydown", (ev) => {
    const step = ev.shiftKey ? 20 : 5;
    const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
    if (moves[ev.key]) place({ x: point.x + moves[ev.key][0], y: point.y + moves[ev.key][1] });
    else if (ev.key === "Home") place(centre);
    else return;
    ev.preventDefault();
  });
  box.append(svg);
  place(centre, false);
}

// Four or more sources (up to hundreds): the user picks sources by name (a filter box with the matching names as
// buttons, Enter takes the first), gives each a weight (a slider; the share beside it is the normalised weight)
// and removes it with ×. No source picked means every source equally. Presets: uniform, or one source's corner.
const ALL_AS_ROWS = 8;   // up to this many sources, "uniform" lists every source as a row (as the page always did)
const MATCHES_SHOWN = 12;
const NEW_WEIGHT = 0.5;  // a newly picked source's slider: the middle, so it can go either way

function buildPicker(box, names) {
  box.classList.add("many");
  const color = (name) => COLORS[names.indexOf(name) % COLORS.length];
  const uniformPicks = () => (names.length <= ALL_AS_ROWS ? names.map((name) => ({ name, weight: NEW_WEIGHT })) : []);

  const tools = el("div", "pick-tools");
  const filter = el("input");
  Object.assign(filter, { type: "search", id: "source-filter", autocomplete: "off", spellcheck: false,
    placeholder: `add a source: search ${names.length}…` });
  filter.setAttribute("aria-label", `add a source to the mix: type part of its name (${names.length} sources)`);
  filter.setAttribute("aria-controls", "source-matches");
  const preset = el("select");
  preset.id = "dial-preset";
  preset.setAttribute("aria-label", "dial preset");
  preset.append(new Option("presets…", ""), new Option(`uniform (all ${names.length})`, "uniform"));
  const corners = el("optgroup");
  corners.label = "one source (its corner)";
  for (const n of names) corners.append(new Option(n, `corner:${n}`));
  preset.append(corners);
  tools.append(filter, preset);

  const matches = el("div", "pick-matches");
  matches.id = "source-matches";
  matches.setAttribute("aria-live", "polite");
  const head = el("p", "pick-head");
  const list = el("div", "pick-list");
  list.id = "dial-picks";
  list.setAttribute("role", "group");
  list.setAttribute("aria-label", "sources in the mix and their weights");
  box.append(tools, matches, head, list);

  const shares = {};
  const picked = (name) => state.picks.some((p) => p.name === name);
  const sync = () => {  // state.dial from the picks; the shares beside the sliders
    state.dial = state.picks.length ? Object.fromEntries(state.picks.map((p) => [p.name, p.weight]))
      : Object.fromEntries(names.map((n) => [n, 1]));
    const w = weightsOf(state.dial);
    for (const p of state.picks) shares[p.name].textContent = w ? fmt(w[p.name]) : "–";
  };
  const renderHead = () => {
    head.textContent = state.picks.length
      ? `in the mix: ${state.picks.length} of ${names.length} sources`
      : `no source picked: all ${names.length} equally`;
  };
  const renderRows = () => {
    list.textContent = "";
    for (const key of Object.keys(shares)) delete shares[key];
    for (const p of state.picks) {
      const row = el("div", "weight-row");
      row.dataset.source = p.name;
      const label = el("label", "weight-name", p.name);
      label.htmlFor = `w-${p.name}`;
      label.style.color = color(p.name);
      label.title = p.name;
      const input = el("input");
      Object.assign(input, { type: "range", id: `w-${p.name}`, min: "0", max: "1", step: "0.01",
        value: String(p.weight) });
      input.style.setProperty("--a", color(p.name));
      input.classList.add("single");
      input.setAttribute("aria-label", `weight of ${p.name}`);
      shares[p.name] = el("output", "share");
      shares[p.name].htmlFor = `w-${p.name}`;
      shares[p.name].title = "share of the mix (the weights, normalised)";
      input.addEventListener("input", () => {
        p.weight = Number(input.value);
        sync();
        dialMoved();
      });
      const remove = el("button", "pick-remove", "×");
      remove.type = "button";
      remove.setAttribute("aria-label", `remove ${p.name}`);
      remove.title = `remove ${p.name} from the mix`;
      remove.addEventListener("click", () => {
        state.picks = state.picks.filter((q) => q !== p);
        changed();
        filter.focus();
      });
      row.append(label, input, shares[p.name], remove);
      list.append(row);
    }
  };
  const renderMatches = () => {
    matches.textContent = "";
    const q = filter.value.trim().toLowerCase();
    if (!q) return;
    const found = names.filter((n) => n.toLowerCase().includes(q));
    const free = found.filter((n) => !picked(n));
    for (const n of free.slice(0, MATCHES_SHOWN)) {
      const b = el("button", "pick-match", `+ ${n}`);
      b.type = "button";
      b.dataset.source = n;
      b.style.setProperty("--c", color(n));
      b.setAttribute("aria-label", `add ${n}`);
      b.addEventListener("click", () => add(n));
      matches.append(b);
    }
    if (free.length > MATCHES_SHOWN) {
      matches.append(el("span", "pick-note", `+ ${free.length - MATCHES_SHOWN} more: keep typing`));
    } else if (!free.length) {
      const why = found.length ? `${found.length === 1 ? found[0] : "every match"} is in the mix already`
        : `no source matches “${filter.value.trim()}”`;
      matches.append(el("span", "pick-note", why));
    }
  };
  const changed = () => {  // the picks changed: redraw, and regenerate like a moved dial
    renderRows();
    renderHead();
    renderMatches();
    sync();
    dialMoved();
  };
  const add = (name) => {
    if (!picked(name)) state.picks = [...state.picks, { name, weight: NEW_WEIGHT }];
    filter.value = "";
    changed();
    filter.focus();
  };

  filter.addEventListener("input", renderMatches);
  filter.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") { filter.value = ""; renderMatches(); return; }
    if (ev.key !== "Enter") return;
    ev.preventDefault();
    const q = filter.value.trim().toLowerCase();
    if (!q) return;
    const exact = names.find((n) => n.toLowerCase() === q);
    const first = names.find((n) => n.toLowerCase().includes(q) && !picked(n));
    if (exact || first) add(exact || first);
  });
  preset.addEventListener("change", () => {
    const v = preset.value;
    preset.value = "";
    if (v === "uniform") state.picks = uniformPicks();
    else if (v.startsWith("corner:")) state.picks = [{ name: v.slice(7), weight: 1 }];
    else return;
    changed();
  });

  state.picks = uniformPicks();
  renderRows();
  renderHead();
  sync();
}

// ---------------------------------------------------------------- mode

function buildModes(modes, current) {
  const select = $("mode");
  for (const m of modes) {
    const opt = el("option", "", m === current ? `${m} (default)` : m);
    opt.value = m;
    opt.title = MODE_HINTS[m] || "";
    select.append(opt);
  }
  select.value = current;
  $("mode-row").hidden = $("mode-hint").hidden = !modes.length;
  select.addEventListener("change", () => { modeChanged(); dialMoved(); });  // restarts like the dial
  modeChanged();
}

// The hint under the select; the calibration only holds in the mode it was measured in (else the server says 422).
function modeChanged() {
  const mode = $("mode").value, cal = state.info.calibration_mode;
  $("mode-hint").textContent = MODE_HINTS[mode] ? `${mode}: ${MODE_HINTS[mode]}` : "";
  const off = Boolean(cal && mode && mode !== cal);
  $("calibrated").disabled = off;
  $("calibrated-why").hidden = !off || $("calibrated-row").hidden;
  $("calibrated-why").textContent = off ? `calibrated: only in the ${cal} mode, where it was measured` : "";
}

// ---------------------------------------------------------------- requests

// The number boxes: the label the page shows, the box's id and the request field it sets. The page keeps no copy
// of the defaults: a cleared box is left out of the request, and the server's default applies (for the seed: a
// random one).
const NUMBER_BOXES = [
  { label: "length", id: "length", field: "max_new_tokens", integer: true },
  { label: "temperature", id: "temperature", field: "temperature", integer: false },
  { label: "top-k", id: "top-k", field: "top_k", integer: true },
  { label: "seed", id: "seed", field: "seed", integer: true },
];

// A message for the user, and the ids of the boxes it is about (marked aria-invalid until the next request).
class PageError extends Error {
  constructor(message, boxes = []) {
    super(message);
    this.boxes = boxes;
  }
}

function markInvalid(ids) {
  for (const b of NUMBER_BOXES) $(b.id).removeAttribute("aria-invalid");
  $("prompt").removeAttribute("aria-invalid");
  for (const id of ids) $(id).setAttribute("aria-invalid", "true");
}

function showError(e, statusId = "status") {
  setStatus(e instanceof TypeError ? `network error: ${e.message}` : e.message, "error", statusId);
  markInvalid(e.boxes || []);
}

// The number boxes' fields of a request, or a PageError naming the box that does not hold a number.
function numberFields() {
  const fields = {};
  for (const { label, id, field, integer } of NUMBER_BOXES) {
    const box = $(id);
    const text = box.value.trim();
    // the browser reads text that is not a number ("1e", "--") as "": badInput tells it from a cleared box
    if (box.validity.badInput || (text !== "" && !Number.isFinite(Number(text)))) {
      throw new PageError(`${label}: not a number (clear the box for the default)`, [id]);
    }
    if (text === "") continue;  // cleared: the server's default
    const x = Number(text);
    if (integer && !Number.isInteger(x)) throw new PageError(`${label}: must be a whole number, got ${text}`, [id]);
    fields[field] = x;
  }
  return fields;
}

// The body of POST /api/generate; throws a PageError for a box that does not hold a number.
function request(stream) {
  markInvalid([]);
  return {
    prompt: $("prompt").value,
    dial: dialToSend(),
    ...numberFields(),
    calibrated: !$("calibrated-row").hidden && !$("calibrated").disabled && $("calibrated").checked,
    mode: $("mode").value || undefined,  // undefined (left out): the server's default
    stream,
  };
}

// A request field as the page names it: "length (max_new_tokens)", "temperature", "prompt".
function fieldName(field) {
  const box = NUMBER_BOXES.find((b) => b.field === field);
  return box && box.label !== field ? `${box.label} (${field})` : field;
}

// The PageError of a failed response, naming the field: FastAPI's 422 is
// {"detail": [{"loc": ["body", field, ...], "msg": "..."}]}, other errors (429, ...) {"detail": "..."}.
async function responseError(res) {
  let detail = null;
  try { detail = (await res.json()).detail; } catch { /* not JSON */ }
  const boxes = [];
  let msg;
  if (Array.isArray(detail)) {
    msg = detail.map((d) => {
      const [field, ...rest] = (d.loc || []).filter((x) => x !== "body");
      if (field === undefined || field === "") return d.msg;
      const box = NUMBER_BOXES.find((b) => b.field === field);
      if (box) boxes.push(box.id);
      else if (field === "prompt") boxes.push("prompt");
      return `${[fieldName(field), ...rest].join(".")}: ${d.msg}`;
    }).join("; ");
  } else if (typeof detail === "string") msg = detail;
  else if (detail) msg = JSON.stringify(detail);
  else msg = res.statusText || "request failed";
  return new PageError(`error (HTTP ${res.status}): ${msg}`, boxes);
}

const sleep = (ms, signal) => new Promise((resolve, reject) => {
  const t = setTimeout(resolve, ms);
  signal.addEventListener("abort", () => { clearTimeout(t); reject(new DOMException("aborted", "AbortError")); },
    { once: true });
});

// POST /api/generate (or `url`); on 429 (the server is still busy with a request we just cancelled) retry a few
// times.
async function post(body, signal, url = "/api/generate") {
  for (let attempt = 0; ; attempt++) {
    const res = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: body.stream ? "text/event-stream" : "application/json" },
      body: JSON.stringify(body),
      signal,
    });
    if (res.ok) return res;
    if (res.status === 429 && attempt < 4) { await sleep(400 * (attempt + 1), signal); continue; }
    throw await responseError(res);
  }
}

// Server-sent events of a fetch response: yields the JSON of each `data:` event.
async function* sseEvents(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  const parse = (block) => {
    const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:"))
      .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
    return data ? JSON.parse(data) : null;
  };
  for (;;) {
    const { value, done } = await reader.read();
    buf += done ? decoder.decode() : decoder.decode(value, { stream: true });
    let m;
    while ((m = /\r?\n\r?\n/.exec(buf))) {
      const ev = parse(buf.slice(0, m.index));
      buf = buf.slice(m.index + m[0].length);
      if (ev) yield ev;
    }
    if (done) break;
  }
  const last = parse(buf.trim());
  if (last) yield last;
}

// ---------------------------------------------------------------- streaming generation

async function generate() {
  clearTimeout(state.timer);
  if (state.gen) state.gen.ctrl.abort();
  state.gen = null;
  let body;
  try {
    body = request(true);
  } catch (e) {
    showError(e);
    updateStop();
    return;
  }
  const gen = { ctrl: new AbortController(), n: 0, t0: performance.now() };
  state.gen = gen;
  const out = $("output");
  const text = document.createTextNode("");
  out.textContent = "";
  out.append(el("span", "prompt-echo", body.prompt), text);
  setStatus("generating…", "busy");
  updateStop();
  let finished = false;
  try {
    const res = await post(body, gen.ctrl.signal);
    for await (const msg of sseEvents(res)) {
      if (msg.error) throw new Error(`error: ${msg.error}`);
      if (typeof msg.token === "string") {
        const stick = out.scrollTop + out.clientHeight >= out.scrollHeight - 8;
        text.appendData(msg.token);
        gen.n++;
        if (stick) out.scrollTop = out.scrollHeight;
      }
      if (msg.done) {
        finished = true;
        const secs = ((performance.now() - gen.t0) / 1000).toFixed(1);
        const dial = msg.dial ? ` · ${describe(msg.dial, true)}` : "";
        const mode = msg.mode ? ` · ${msg.mode}` : "";
        setStatus(`done: ${gen.n} tokens · ${secs} s${mode}${dial}`);
      }
    }
    if (!finished) setStatus(`stream ended early after ${gen.n} tokens`, "warn");
  } catch (e) {
    if (gen.ctrl.signal.aborted) return;  // replaced by a newer generation, or stopped
    showError(e);
  } finally {
    if (state.gen === gen) state.gen = null;
    updateStop();
  }
}

const updateStop = () => { $("stop").disabled = !(state.gen || state.sweep); };

// Stop both the streaming generation and the sweep.
function stop() {
  clearTimeout(state.timer);
  if (state.gen) {
    setStatus(`stopped after ${state.gen.n} tokens`, "warn");
    state.gen.ctrl.abort();
    state.gen = null;
  }
  if (state.sweep) {
    setStatus("sweep stopped", "warn", "sweep-status");
    state.sweep.abort();
    state.sweep = null;
  }
  updateStop();
}

// ---------------------------------------------------------------- sweep

// Two sources: five points along the slider. More: every source's corner, then the uniform middle; with sources
// picked by name, the corners of those (weight > 0), then their mix (unless it is the uniform middle), then uniform.
function sweepPositions() {
  const s = state.sources;
  if (s.length === 2) return [0, 0.25, 0.5, 0.75, 1].map((d) => ({ label: fmt(d), dial: d }));
  const cornerOf = (name) => ({ label: name, dial: Object.fromEntries(s.map((k) => [k, k === name ? 1 : 0])) });
  const uniform = { label: "uniform", dial: Object.fromEntries(s.map((k) => [k, 1])) };
  const picks = (state.picks || []).filter((p) => p.weight > 0);
  if (!picks.length) return [...s.map(cornerOf), uniform];
  const mix = dialToSend();
  const isUniform = picks.length === s.length && picks.every((p) => p.weight === picks[0].weight);
  const mixed = picks.length > 1 && !isUniform ? [{ label: "mix", dial: mix }] : [];
  return [...picks.map((p) => cornerOf(p.name)), ...mixed, uniform];
}

async function sweep() {
  if (state.sweep) state.sweep.abort();
  state.sweep = null;
  $("sweep-card").hidden = false;
  let base;
  try {
    base = request(false);
  } catch (e) {
    showError(e, "sweep-status");
    updateStop();
    return;
  }
  const ctrl = new AbortController();
  state.sweep = ctrl;
  updateStop();
  if (base.seed === undefined) base.seed = Math.floor(Math.random() * 2 ** 31);  // one seed for every column
  const positions = sweepPositions();
  const grid = $("sweep-output");
  grid.textContent = "";
  const cols = positions.map((p, i) => {
    const col = el("article", "sweep-col");
    const k = state.sources.indexOf(p.label);  // a corner: its source's colour
    col.style.setProperty("--col", typeof p.dial === "number"
      ? `color-mix(in srgb, ${COLORS[1]} ${Math.round(p.dial * 100)}%, ${COLORS[0]})`
      : COLORS[(k >= 0 ? k : i) % COLORS.length]);
    const head = el("header", "sweep-head");
    head.append(el("strong", "", p.label), el("span", "sweep-weights", describe(p.dial, true)));
    const pre = el("pre", "sweep-text");
    pre.append(el("span", "prompt-echo", base.prompt));
    const note = el("p", "sweep-note", "waiting…");
    col.append(head, pre, note);
    grid.append(col);
    return { col, head, pre, note };
  });
  $("sweep-card").scrollIntoView({ behavior: "smooth", block: "nearest" });
  let failed = 0, firstError = null;
  for (let i = 0; i < positions.length; i++) {
    const c = cols[i];
    setStatus(`sweep ${i + 1}/${positions.length} · seed ${base.seed}…`, "busy", "sweep-status");
    c.note.textContent = "generating…";
    c.col.classList.add("busy");
    try {
      const res = await post({ ...base, dial: positions[i].dial }, ctrl.signal);
      const data = await res.json();
      c.pre.append(document.createTextNode(data.text ?? ""));
      if (data.dial) c.head.querySelector(".sweep-weights").textContent = describe(data.dial, true);
      c.note.textContent = "";
    } catch (e) {
      if (ctrl.signal.aborted) {  // stopped, or replaced by a newer sweep
        for (const rest of cols.slice(i)) rest.note.textContent = "stopped";
        return;
      }
      failed++;
      firstError = firstError || e;
      c.note.textContent = e.message;
      c.note.classList.add("error");
    } finally {
      c.col.classList.remove("busy");
    }
  }
  if (state.sweep === ctrl) state.sweep = null;
  updateStop();
  const mode = base.mode ? ` · ${base.mode}` : "";
  if (!failed) {
    setStatus(`sweep done · seed ${base.seed}${mode}`, "", "sweep-status");
    return;
  }
  markInvalid(firstError.boxes || []);
  setStatus(`sweep done · seed ${base.seed}${mode} · ${failed} of ${positions.length} failed: ${firstError.message}`,
    "error", "sweep-status");
}

// ---------------------------------------------------------------- which source?

// A source's colour: the dial's own up to eight sources, else hues spread around the wheel (the golden angle).
const sourceColor = (k) => (state.sources.length <= COLORS.length ? COLORS[k]
  : `hsl(${Math.round(k * 137.508) % 360} 65% 55%)`);

// POST /api/attribute: `text` shown token by token, each token's background the colour of its most probable source
// (the posterior after reading it, uniform prior), stronger the surer; a legend of the sources that appear, and
// the whole text's posterior.
async function attribute(text) {
  if (state.attr) state.attr.abort();
  const ctrl = new AbortController();
  state.attr = ctrl;
  const result = $("attr-result"), legend = $("attr-legend"), summary = $("attr-summary");
  $("attr-card").scrollIntoView({ behavior: "smooth", block: "nearest" });
  if (!text) {
    setStatus("nothing to attribute: generate a sample, or paste a text above", "warn", "attr-status");
    return;
  }
  setStatus("reading the text…", "busy", "attr-status");
  let data;
  try {
    const res = await post({ text, dial: "uniform", mode: $("attr-mode").value }, ctrl.signal, "/api/attribute");
    data = await res.json();
  } catch (e) {
    if (!ctrl.signal.aborted) setStatus(e instanceof TypeError ? `network error: ${e.message}` : e.message, "error",
      "attr-status");
    return;
  } finally {
    if (state.attr === ctrl) state.attr = null;
  }
  const n = data.sources.length, counts = new Array(n).fill(0);
  const named = (p) => Object.fromEntries(data.sources.map((s, j) => [s, p[j]]));
  result.textContent = legend.textContent = "";
  data.tokens.forEach((tok, i) => {
    const k = data.top_per_token[i], p = data.posterior[i];
    const sure = n > 1 ? (p[k] - 1 / n) / (1 - 1 / n) : 1;  // 0 at an even split, 1 when certain
    const span = el("span", "attr-tok", tok);
    span.dataset.source = String(k);
    span.style.background = `color-mix(in srgb, ${sourceColor(k)} ${Math.round(12 + 58 * sure)}%, transparent)`;
    span.title = describe(named(p), true);
    result.append(span);
    counts[k]++;
  });
  const shown = data.sources.map((s, k) => k).filter((k) => counts[k]).sort((a, b) => counts[b] - counts[a]);
  for (const k of shown) {
    const item = el("span", "attr-key");
    item.dataset.source = String(k);
    const swatch = el("span", "attr-swatch");
    swatch.style.background = sourceColor(k);
    item.append(swatch, `${data.sources[k]} (${counts[k]} tokens)`);
    legend.append(item);
  }
  if (shown.length < n) legend.append(el("span", "hint", `${n - shown.length} other sources lead no token`));
  summary.textContent = `whole text: ${describe(named(data.final), true)} · top ${data.top} · mean over tokens: ` +
    describe(named(data.mean), true);
  summary.hidden = result.hidden = false;
  setStatus(`done: ${data.tokens.length} tokens · ${data.mode} · uniform prior`, "", "attr-status");
}

// ---------------------------------------------------------------- start

async function init() {
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", stop);
  $("sweep").addEventListener("click", sweep);
  $("attr-output").addEventListener("click", () => attribute($("output").textContent));
  $("attr-paste").addEventListener("click", () => attribute($("attr-text").value));
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); generate(); }
  });
  let info;
  try {
    const res = await fetch("/api/info");
    if (!res.ok) throw await responseError(res);
    info = await res.json();
  } catch (e) {
    $("model-info").textContent = "model unavailable";
    setStatus(`cannot load /api/info: ${e.message}`, "error");
    $("generate").disabled = $("sweep").disabled = $("attr-output").disabled = $("attr-paste").disabled = true;
    return;
  }
  state.info = info;
  state.sources = info.sources || [];
  const m = info.model || {};
  const bits = [
    m.recipe && `${m.recipe} recipe`,
    m.params && `${humanCount(m.params)} params`,
    m.step !== undefined && `step ${Number(m.step).toLocaleString("en-US")}`,
    m.tokenizer && `${m.tokenizer} tokenizer`,
    state.sources.length <= COMPACT_MAX ? `sources: ${state.sources.join(", ")}`
      : `${state.sources.length} sources: ${state.sources.slice(0, 3).join(", ")}, …, ${state.sources.at(-1)}`,
  ].filter(Boolean);
  $("model-info").textContent = bits.join(" · ");
  const more = state.sources.length > COMPACT_MAX ? `\nsources: ${state.sources.join(", ")}` : "";
  if (m.n_layer) {
    $("model-info").title = `${m.n_layer} layers × ${m.n_embd} wide, ${m.n_head} heads, context ${m.block_size}, ` +
      `vocabulary ${m.vocab_size}${more}`;
  } else if (more) $("model-info").title = more.trim();
  const defaults = info.sampling || {};  // the engine's sampling defaults, declared once (abcgpt/sampling.py)
  if (defaults.temperature !== undefined) $("temperature").value = defaults.temperature;
  if (defaults.top_k !== undefined) $("top-k").value = defaults.top_k;
  if (defaults.max_new_tokens !== undefined) $("length").value = defaults.max_new_tokens;
  const lim = info.limits || {};
  if (lim.max_prompt_chars) $("prompt").maxLength = $("attr-text").maxLength = lim.max_prompt_chars;
  if (lim.max_new_tokens) {
    $("length").max = lim.max_new_tokens;
    if (Number($("length").value) > lim.max_new_tokens) $("length").value = lim.max_new_tokens;
  }
  $("calibrated-row").hidden = !(info.calibrated && state.sources.length === 2);
  buildModes(info.modes || [], info.mode);
  if (state.sources.length < 2) {
    setStatus("the model has fewer than two sources: no dial", "warn");
    state.dial = state.sources.length ? { [state.sources[0]]: 1 } : 0.5;
    return;
  }
  state.dial = state.sources.length === 2 ? 0.5 : null;
  buildDial();
}

document.addEventListener("DOMContentLoaded", init);
