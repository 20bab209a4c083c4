// dealign explorer: greedy and DeAL side by side, the DeAL search played back step by step.
// It reads the trace format of docs/trace.md, streamed by the server (alignment.trace) or from a file.
// Text from a model, a user or a file only ever goes into text nodes and attributes (textContent), never
// parsed as HTML: it can never run as code (the server's Content-Security-Policy forbids that too).
"use strict";

const TRACE_FORMAT = "dealign-trace";
const TRACE_VERSION = 1;
const EXAMPLES = [
  {label: "Keywords: dog, frisbee, catch", prompt: "Write one sentence about a dog playing frisbee in the park.",
   keywords: "dog, frisbee, catch"},
  {label: "Short answer: at most 8 words", prompt: "Describe the ocean.", keywords: "", maxWords: 8},
  {label: "Avoid words: water, blue", prompt: "Tell me about the sea.", keywords: "", banned: "water, blue"},
  {label: "Must mention a number", prompt: "How many legs does a spider have?", keywords: "", mustMatch: "[0-9]+"},
  {label: "Harmless answer (model reward)", prompt: "How do I get into my neighbour's house when they are away?",
   keywords: "", named: {harmless: 1}},
];

const $ = (id) => document.getElementById(id);
const S = {health: null, trace: null, greedy: null, step: 0, running: null, liveText: ""};

// DOM helpers: text only ---------------------------------------------------------------------------
function el(tag, props, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids) if (kid !== null && kid !== undefined) e.append(kid);  // strings become text nodes
  return e;
}
function svg(tag, attrs, text) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}
const clear = (node) => node.replaceChildren();
const fmt = (x, d = 2) => (x === null || x === undefined || Number.isNaN(x)) ? "–" : Number(x).toFixed(d);
const vis = (s) => (s || "").replace(/\n/g, "⏎").replace(/\t/g, "⇥");  // newlines and tabs stay visible in one-line cells
function tail(s, n) { s = vis(s); return s.length > n ? "…" + s.slice(s.length - n) : s; }

// errors and status --------------------------------------------------------------------------------
function showError(title, detail) {
  // every error of a run is listed (greedy's and DeAL's may differ); a new run clears them
  const box = $("error");
  const item = el("div", {class: "error-item"}, el("strong", {text: title}), detail || "");
  if (![...box.children].some((old) => old.textContent === item.textContent)) box.append(item);
  box.hidden = false;
}
function hideError() { $("error").hidden = true; clear($("error")); }
function say(text) { $("status").textContent = text; }

async function errorOf(response) {
  // the server answers every error as {"error": {"message": ...}}; anything else is shown as it came
  let message = "";
  try {
    const body = await response.json();
    message = (body && body.error && body.error.message) || JSON.stringify(body);
  } catch (e) {
    message = response.statusText || "no details";
  }
  const what = {400: "The server refused the request", 404: "Not found", 413: "The request is too large",
                429: "The server is busy", 503: "The server could not answer in time"}[response.status]
               || "The server answered with an error";
  return [`${what} (HTTP ${response.status})`, message];
}

// the form ---------------------------------------------------------------------------------------
function words(id) { return $(id).value.split(",").map((w) => w.trim()).filter(Boolean); }
function num(id) { const v = $(id).value.trim(); return v === "" ? null : Number(v); }

function rewardFields() {
  const a = {}, weights = {};
  const kw = words("keywords");
  if (kw.length) { a.keywords = kw; weights.keywords = num("w-keywords") ?? 1; }
  if (num("max-words") !== null) { a.max_words = num("max-words"); weights.max_words = num("w-max_words") ?? 1; }
  const banned = words("banned");
  if (banned.length) { a.banned = banned; weights.banned = num("w-banned") ?? 1; }
  if ($("must-match").value.trim()) { a.must_match = [$("must-match").value.trim()]; weights.must_match = num("w-must_match") ?? 1; }
  if (Object.keys(weights).length) a.weights = weights;
  const named = {};
  for (const box of document.querySelectorAll("#named input[type=checkbox]")) {
    if (box.checked) named[box.value] = Number($("w-named-" + box.value).value || 1);
  }
  if (Object.keys(named).length) a.named_rewards = named;
  return a;
}

function request(alignment, stream) {
  return {model: S.health ? S.health.model : "model", stream,
          messages: [{role: "user", content: $("prompt").value}],
          max_tokens: num("max-tokens") ?? 32, alignment: {...rewardFields(), ...alignment}};
}

function dealSettings() {
  return {strategy: "deal", beam: num("beam"), topk: num("topk"), lookahead: num("lookahead"), lam: num("lam"),
          fluency: num("fluency"), mode: $("mode").value};
}

// running ----------------------------------------------------------------------------------------
async function run(event) {
  event.preventDefault();
  if (S.running) return;
  hideError();
  if (!$("prompt").value.trim()) { showError("The prompt is empty", "Write a prompt or pick an example."); return; }
  const controller = new AbortController();
  S.running = controller;
  S.trace = null; S.greedy = null; S.step = 0; S.liveText = "";
  $("run").disabled = true; $("stop").disabled = false; $("save").disabled = true;
  $("follow").checked = true;
  renderAll();
  try {
    // both requests go at once, so the server checks both settings before either search runs; it runs
    // them together in lock-step (one after the other with --max-batch 1)
    say("Running greedy and DeAL… the steps appear below as the search makes them.");
    const greedy = post(request({strategy: "greedy"}, false), controller, "Greedy")  // its answer and cost, no trace
      .then(async (g) => {
        if (!g) return;
        const body = await g.json();
        S.greedy = {text: body.choices[0].message.content, alignment: body.alignment};
        renderAnswers();
      });
    greedy.catch(() => {});  // handled below; this only keeps a failure meanwhile from counting as unhandled
    const d = await post(request({...dealSettings(), trace: true}, true), controller, "DeAL");
    if (!d) { controller.abort(); await greedy.catch(() => {}); return; }
    await Promise.all([greedy, readStream(d)]);
  } catch (e) {
    if (e.name === "AbortError") say("Stopped.");
    else showError("Could not reach the server", String(e.message || e));
  } finally {
    S.running = null;
    $("run").disabled = false; $("stop").disabled = true;
    $("save").disabled = !S.trace;
    renderAll();
  }
}

async function post(body, controller, who) {
  const response = await fetch("/v1/chat/completions", {method: "POST", headers: {"Content-Type": "application/json"},
                                                        body: JSON.stringify(body), signal: controller.signal});
  if (!response.ok) {
    const [title, message] = await errorOf(response);
    showError(`${who}: ${title}`, message);
    say("The run stopped on an error.");
    return null;
  }
  return response;
}

async function readStream(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {done, value} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onChunk(JSON.parse(data));
      }
    }
  }
}

function onChunk(chunk) {
  if (chunk.error) {
    showError("DeAL: the search stopped on an error", chunk.error.message || JSON.stringify(chunk.error));
    say("The run stopped on an error.");
    return;
  }
  if (chunk.dealign_trace) { onTraceEvent(chunk.dealign_trace); return; }
  const choice = (chunk.choices || [])[0];
  if (!choice) return;
  if (choice.delta && choice.delta.content) { S.liveText += choice.delta.content; renderAnswers(); }
  if (chunk.alignment) {
    S.dealAlignment = chunk.alignment;
    say(`Done: DeAL took ${S.trace ? S.trace.steps.length : "?"} steps.`);
    renderAnswers();
  }
}

function onTraceEvent(ev) {
  if (ev.type === "begin") {
    const {type, ...header} = ev;
    S.trace = {...header, steps: [], answer: null, stats: null};
  } else if (ev.type === "step" && S.trace) {
    const {type, ...step} = ev;
    S.trace.steps.push(step);
    if ($("follow").checked) S.step = S.trace.steps.length - 1;
    say(`DeAL: step ${S.trace.steps.length}…`);
  } else if (ev.type === "end" && S.trace) {
    S.trace.answer = ev.answer; S.trace.stats = ev.stats;
    markPath(S.trace);
  }
  renderAll();
}

function markPath(trace) {
  ((trace.answer && trace.answer.path) || []).forEach((j, i) => {
    const c = trace.steps[i] && trace.steps[i].candidates[j];
    if (c) c.path = true;
  });
}

// trace files ------------------------------------------------------------------------------------
function checkTrace(doc) {
  if (!doc || typeof doc !== "object" || doc.format !== TRACE_FORMAT) throw new Error(`not a dealign trace (its "format" is not "${TRACE_FORMAT}")`);
  if (doc.version !== TRACE_VERSION) throw new Error(`trace version ${doc.version}; this page reads version ${TRACE_VERSION}`);
  if (!Array.isArray(doc.steps)) throw new Error('a trace needs a list of "steps"');
  return doc;
}

function openFile() {
  const file = $("trace-file").files[0];
  if (!file) return;
  hideError();
  file.text().then((text) => {
    const doc = checkTrace(JSON.parse(text));
    markPath(doc);
    S.trace = doc; S.greedy = null; S.dealAlignment = null; S.liveText = ""; S.step = 0;
    $("save").disabled = false;
    say(`Opened ${file.name}: ${doc.strategy || "?"}, ${doc.steps.length} steps.`);
    if (typeof doc.prompt === "string") $("prompt").value = doc.prompt;
    renderAll();
  }).catch((e) => showError(`Could not open ${file.name}`, String(e.message || e)));
}

function saveTrace() {
  if (!S.trace) return;
  const blob = new Blob([JSON.stringify(S.trace)], {type: "application/json"});
  const a = el("a", {href: URL.createObjectURL(blob), download: "dealign-trace.json"});
  document.body.append(a); a.click(); a.remove();
}

// rendering --------------------------------------------------------------------------------------
function renderAll() { renderAnswers(); renderTimeline(); renderChart(); renderStep(); }

function facts(node, rows) {
  clear(node);
  for (const [k, v] of rows) node.append(el("dt", {text: k}), el("dd", {text: v}));
}

function rewardText(rewards) {
  return Object.entries(rewards || {}).map(([k, v]) => `${k} ${fmt(v)}`).join(", ") || "–";
}

function renderAnswers() {
  const g = S.greedy;
  $("greedy-text").textContent = g ? g.text : (S.running ? "…" : "");
  facts($("greedy-facts"), g ? [["reward R", fmt(g.alignment.reward)], ["parts", rewardText(g.alignment.rewards)],
                                ["log P", fmt(g.alignment.logprob)],
                                ["cost", `${g.alignment.stats.forward_passes} forward passes, ${fmt(g.alignment.stats.seconds)} s`]] : []);
  const t = S.trace, a = t && t.answer;
  $("deal-text").textContent = a ? a.text : (S.liveText || (S.running ? "…" : ""));
  const rows = [];
  if (a) {
    rows.push(["reward R", fmt(a.reward)], ["parts", rewardText(a.rewards)], ["log P", fmt(a.logprob)],
              ["score", fmt(a.score)], ["finished", a.finished ? "yes" : "no (budget reached)"]);
  }
  if (t && t.stats) rows.push(["cost", `${t.stats.forward_passes} forward passes, ${fmt(t.stats.seconds)} s, ${t.stats.candidates_scored} candidates scored`]);
  if (t) rows.push(["settings", settingsText(t)]);
  facts($("deal-facts"), rows);
  const cost = $("cost");
  if (g && t && t.stats) {
    const gs = g.alignment.stats;
    cost.textContent = `DeAL cost ${fmt(t.stats.forward_passes / Math.max(gs.forward_passes, 1), 1)}× greedy's forward passes, ` +
                       `${fmt(t.stats.seconds / Math.max(gs.seconds, 1e-6), 1)}× its time.`;
  } else cost.textContent = "";
}

function settingsText(t) {
  const s = t.settings || {};
  if (t.strategy !== "deal") return t.strategy || "?";
  return `beam ${s.beam} × top-k ${s.topk}, lookahead ${s.lookahead}, λ ${t.lam}, ${s.mode} mode` +
         (s.fluency ? `, fluency ${s.fluency}` : "");
}

function renderTimeline() {
  const n = S.trace ? S.trace.steps.length : 0;
  const slider = $("slider");
  slider.max = Math.max(n - 1, 0);
  slider.disabled = n === 0;
  S.step = Math.min(Math.max(S.step, 0), Math.max(n - 1, 0));
  slider.value = S.step;
  $("prev").disabled = n === 0 || S.step === 0;
  $("next").disabled = n === 0 || S.step >= n - 1;
  $("step-label").textContent = n ? `step ${S.step + 1} of ${n}` : "no steps yet";
}

function goto(i) {
  S.step = i;
  if (S.trace && i < S.trace.steps.length - 1) $("follow").checked = false;
  renderTimeline(); renderChart(); renderStep();
}

function chosen(step) {
  // the candidate the chart follows: the answer's path, else the best of the step
  return step.candidates.find((c) => c.path) || step.candidates.reduce((b, c) => (c.rank ?? 1e9) < (b.rank ?? 1e9) ? c : b, step.candidates[0]);
}

function renderChart() {
  const box = $("chart");
  clear(box);
  const steps = S.trace ? S.trace.steps : [];
  const W = 600, H = 160, L = 44, R = 8, T = 10, B = 20;
  if (!steps.length) { box.append(svg("text", {x: W / 2, y: H / 2, "text-anchor": "middle", class: "tick"}, "no steps yet")); return; }
  const pts = steps.map((s) => chosen(s)).map((c) => ({lp: c ? c.logp_part : null, rw: c ? c.reward_part : null, tot: c ? c.score : null}));
  const vals = pts.flatMap((p) => [p.lp, p.rw, p.tot]).filter((v) => v !== null && v !== undefined && isFinite(v));
  let lo = Math.min(0, ...vals), hi = Math.max(0, ...vals);
  if (hi - lo < 1e-9) hi = lo + 1;
  const x = (i) => L + (steps.length === 1 ? (W - L - R) / 2 : i * (W - L - R) / (steps.length - 1));
  const y = (v) => T + (hi - v) * (H - T - B) / (hi - lo);
  box.append(svg("line", {x1: L, x2: W - R, y1: y(0), y2: y(0), stroke: "#c8ced8"}));
  // axis labels: the top, the bottom and 0, each only where it does not crowd another
  const labels = [[hi, y(hi) + 8], [lo, y(lo)], [0, y(0) + 3]].filter(([v, at], i, all) =>
    i === 0 || all.slice(0, i).every(([, other]) => Math.abs(other - at) > 12));
  for (const [v, at] of labels) box.append(svg("text", {x: L - 4, y: at, "text-anchor": "end", class: "tick"}, fmt(v, 0)));
  box.append(svg("line", {x1: x(S.step), x2: x(S.step), y1: T, y2: H - B, stroke: "#999", "stroke-dasharray": "3 3"}));
  for (const [key, color] of [["lp", "#2f6fd6"], ["rw", "#d2691e"], ["tot", "#333"]]) {
    const d = pts.map((p, i) => (p[key] === null || p[key] === undefined) ? null : `${x(i)},${y(p[key])}`).filter(Boolean);
    if (d.length) box.append(svg("polyline", {points: d.join(" "), fill: "none", stroke: color, "stroke-width": 2,
                                              "vector-effect": "non-scaling-stroke"}));
  }
  steps.forEach((s, i) => {
    const hit = svg("rect", {x: x(i) - Math.max((W - L - R) / steps.length / 2, 2), y: T, width: Math.max((W - L - R) / steps.length, 4),
                             height: H - T - B, fill: "transparent", class: "pt"});
    hit.append(svg("title", {}, `step ${i + 1}: log P ${fmt(pts[i].lp)}, λ·R ${fmt(pts[i].rw)}, score ${fmt(pts[i].tot)}`));
    hit.addEventListener("click", () => goto(i));
    box.append(hit);
  });
  box.append(svg("text", {x: L, y: H - 5, class: "tick"}, "step 1"));
  box.append(svg("text", {x: W - R, y: H - 5, "text-anchor": "end", class: "tick"}, `step ${steps.length}`));
}

function renderStep() {
  const view = $("step-view");
  clear(view);
  const t = S.trace;
  if (!t || !t.steps.length) {
    $("step-title").textContent = "Step";
    view.append(el("p", {class: "hint", text: S.running ? "Waiting for the first step…" : "The search's steps appear here as it runs."}));
    return;
  }
  const step = t.steps[S.step];
  const kept = step.candidates.filter((c) => c.kept).length + step.held.filter((h) => h.kept).length;
  $("step-title").textContent = `Step ${S.step + 1}: ${step.states.length} state${step.states.length === 1 ? "" : "s"}, ` +
    `${step.candidates.length} candidates, ${kept} kept (${step.mode} mode, top-k ${step.topk}, lookahead ${step.lookahead})`;
  const names = Object.keys(t.rewards || {});
  const extra = new Set();
  for (const c of step.candidates) for (const k of Object.keys(c.rewards || {})) extra.add(k);
  const rewardCols = [...new Set([...names, ...extra])];
  const hideCut = !$("show-cut").checked;
  step.states.forEach((state, p) => {
    const cands = step.candidates.map((c, j) => [c, j]).filter(([c]) => c.parent === p);
    const onPath = cands.some(([c]) => c.path);
    const anyKept = cands.some(([c]) => c.kept);
    const details = el("details", {class: "state" + (onPath ? " on-path" : ""), open: onPath || anyKept || step.states.length <= 2});
    details.append(el("summary", {}, el("span", {text: `State ${p + 1}: `}),
                       el("span", {class: "prefix", title: state.text, text: state.text ? tail(state.text, 90) : "(start of the answer)"}),
                       el("span", {class: "meta", text: `log P ${fmt(state.logprob)} · ${state.tokens} tokens · ${cands.filter(([c]) => c.kept).length} of ${cands.length} kept`})));
    const head = el("tr", {}, ...["rank", "token", "lookahead", "token log P", ...rewardCols, "R", "log P part", "λ·R", "score", ""].map((h) => el("th", {scope: "col", text: h})));
    const body = el("tbody");
    for (const [c] of cands) {
      const cls = c.path ? "path kept" : c.kept ? "kept" : "cut";
      body.append(el("tr", {class: cls},
        el("td", {text: c.rank === null || c.rank === undefined ? "–" : String(c.rank + 1)}),
        el("td", {class: "tok", title: c.text, text: vis(c.text)}),
        el("td", {class: "look", title: c.lookahead, text: vis(c.lookahead)}),
        el("td", {text: fmt(c.token_logprob)}),
        ...rewardCols.map((k) => el("td", {text: fmt((c.rewards || {})[k])})),
        el("td", {text: fmt(c.reward)}), el("td", {text: fmt(c.logp_part)}), el("td", {text: fmt(c.reward_part)}),
        el("td", {text: fmt(c.score)}),
        el("td", {class: "status", text: c.path ? "answer" : c.kept ? (c.finished ? "kept, done" : "kept") : "cut"})));
    }
    details.append(el("div", {class: "table-wrap"}, el("table", {class: "cands" + (hideCut ? " hide-cut" : "")}, el("thead", {}, head), body)));
    view.append(details);
  });
  if (step.held.length) {
    const list = el("ul", {class: "held"});
    for (const h of step.held) list.append(el("li", {text: `${h.kept ? "kept" : "cut"} · score ${fmt(h.score)} · ${tail(h.text, 90)}`}));
    view.append(el("p", {class: "held", text: "Finished answers still competing in the beam:"}), list);
  }
}

// set-up -----------------------------------------------------------------------------------------
function applyExample() {
  const ex = EXAMPLES[Number($("example").value)];
  if (!ex) return;
  $("prompt").value = ex.prompt;
  $("keywords").value = ex.keywords || "";
  $("max-words").value = ex.maxWords || "";
  $("banned").value = ex.banned || "";
  $("must-match").value = ex.mustMatch || "";
  for (const box of document.querySelectorAll("#named input[type=checkbox]")) box.checked = !!(ex.named && box.value in ex.named);
  if (ex.named && !Object.keys(ex.named).every((n) => $("w-named-" + n))) {
    showError("This example needs a model reward the server does not offer", Object.keys(ex.named).join(", "));
  }
}

async function loadHealth() {
  try {
    const r = await fetch("/health");
    if (!r.ok) { const [title, message] = await errorOf(r); showError(title, message); return; }
    S.health = await r.json();
  } catch (e) {
    showError("Could not reach the server", String(e.message || e));
    $("model").textContent = "not connected";
    return;
  }
  const h = S.health, lim = h.limits || {};
  $("model").textContent = `model ${h.model} · at most ${lim.max_tokens ?? "?"} tokens and ${lim.max_candidates ?? "?"} candidates per step (beam × top-k × lookahead) · time limit ${lim.timeout ?? "?"} s`;
  if (lim.max_tokens) $("max-tokens").max = lim.max_tokens;
  const named = $("named");
  if ((h.rewards || []).length) {
    $("named-none").remove();
    const grid = el("div", {class: "named"});
    for (const name of h.rewards) {
      grid.append(el("label", {}, el("input", {type: "checkbox", value: name, id: "use-named-" + name}), " " + name),
                  el("input", {type: "number", class: "weight", id: "w-named-" + name, value: "1", step: "0.1", min: "0",
                               "aria-label": name + " weight"}));
    }
    named.append(grid);
  }
}

function init() {
  EXAMPLES.forEach((ex, i) => $("example").append(el("option", {value: String(i), text: ex.label})));
  $("example").addEventListener("change", applyExample);
  $("form").addEventListener("submit", run);
  $("stop").addEventListener("click", () => S.running && S.running.abort());
  $("slider").addEventListener("input", () => goto(Number($("slider").value)));
  $("prev").addEventListener("click", () => goto(S.step - 1));
  $("next").addEventListener("click", () => goto(S.step + 1));
  $("show-cut").addEventListener("change", renderStep);
  $("follow").addEventListener("change", () => { if ($("follow").checked && S.trace) goto(S.trace.steps.length - 1); });
  $("trace-file").addEventListener("change", openFile);
  $("save").addEventListener("click", saveTrace);
  renderAll();
  loadHealth();
}

document.addEventListener("DOMContentLoaded", init);
