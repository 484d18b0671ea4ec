"use strict";

// The page of `pixelllm serve`: pick an image and a task, send it to POST /v1/{task}, and draw the
// answer over the image. Every result is drawn from its JSON alone (INTERFACE.md): the words of a
// caption with their boxes and points, a box, masks (COCO RLE), dense regions, detections.

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const state = { file: null, tasks: {}, maxUpload: Infinity, objectUrl: null, scale: 1 };

function color(i) {
  return `hsl(${(i * 137.508 + 8) % 360}, 78%, 58%)`; // golden-angle hues: neighbours far apart
}

function rgb(i) {
  const probe = document.createElement("span");
  probe.style.color = color(i);
  document.body.appendChild(probe);
  const parts = getComputedStyle(probe).color.match(/\d+/g).map(Number);
  probe.remove();
  return parts;
}

// -- setup ----------------------------------------------------------------------------------------

async function init() {
  const info = await fetch("/v1/tasks").then((r) => r.json());
  state.tasks = info.tasks;
  state.maxUpload = info.max_upload_bytes;
  $("model").textContent = `Model: ${info.model}.`;
  for (const name of Object.keys(info.tasks)) $("task").append(new Option(name, name));
  for (const [name, system] of Object.entries(info.other_tasks)) {
    const option = new Option(`${name} (needs ${system})`, name);
    option.disabled = true;
    $("task").append(option);
  }
  $("task").addEventListener("change", showFields);
  showFields();
  $("file").addEventListener("change", () => $("file").files[0] && useFile($("file").files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) useFile(e.dataTransfer.files[0]);
  });
  $("run").addEventListener("click", run);
  $("image").addEventListener("error", () => { $("stage").hidden = true; });
  loadSamples();
}

async function loadSamples() {
  const { samples } = await fetch("/v1/samples").then((r) => r.json());
  for (const sample of samples) {
    const button = document.createElement("button");
    button.type = "button";
    button.title = `${sample.name}: "${sample.expression}"`;
    const thumb = document.createElement("img");
    thumb.src = sample.url;
    thumb.alt = sample.name;
    button.append(thumb);
    button.addEventListener("click", async () => {
      const blob = await fetch(sample.url).then((r) => r.blob());
      useFile(new File([blob], sample.url.split("/").pop(), { type: blob.type }));
      const expression = document.querySelector('#fields [name="expression"]');
      if (expression) expression.value = sample.expression;
    });
    $("samples").append(button);
  }
}

function showFields() {
  const task = state.tasks[$("task").value];
  $("summary").textContent = task ? `${task.summary}.` : "";
  $("fields").replaceChildren();
  for (const [name, spec] of Object.entries(task ? task.fields : {})) {
    const label = document.createElement("label");
    label.className = "field";
    label.append(name.replace("_", " "));
    const input = document.createElement("input");
    input.name = name;
    input.dataset.kind = spec.kind;
    input.placeholder = spec.description;
    input.title = spec.description;
    input.required = spec.required;
    if (spec.kind === "integer") input.inputMode = "numeric";
    if (spec.kind === "number") input.inputMode = "decimal";
    input.addEventListener("keydown", (e) => e.key === "Enter" && run());
    label.append(input);
    $("fields").append(label);
  }
}

function useFile(file) {
  state.file = file;
  if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
  state.objectUrl = URL.createObjectURL(file);
  $("image").src = state.objectUrl;
  $("stage").hidden = false;
  $("drop-text").textContent = file.name;
  $("run").disabled = false;
  clear();
}

// -- the request ----------------------------------------------------------------------------------

function formValue(input) {
  const text = input.value.trim();
  if (input.dataset.kind !== "array" || text.startsWith("[")) return text;
  return JSON.stringify(text.split(/[\s,]+/).filter(Boolean).map(Number)); // "10 20 200 180" works too
}

async function run() {
  if (!state.file) return;
  if (state.file.size > state.maxUpload) {
    return fail(`The image is ${state.file.size.toLocaleString()} bytes; this server takes at most ${state.maxUpload.toLocaleString()}.`);
  }
  const task = $("task").value;
  const body = new FormData();
  body.append("image", state.file);
  const sent = {};
  for (const input of $("fields").querySelectorAll("input")) {
    if (input.value.trim()) body.append(input.name, (sent[input.name] = formValue(input)));
  }
  const headers = $("key").value ? { Authorization: `Bearer ${$("key").value}` } : {};
  setState("running", `Running ${task}…`);
  clear();
  const started = performance.now();
  let response;
  let answer;
  try {
    response = await fetch(`/v1/${task}`, { method: "POST", body, headers });
    answer = await response.json();
  } catch (err) {
    return fail(`No answer from the server (${err.message}).`);
  }
  if (!response.ok) {
    if (response.status === 401) $("auth").hidden = false;
    const retry = response.headers.get("Retry-After");
    return fail(`${response.status}: ${answer.error}` + (retry ? ` (retry in ${retry} s)` : ""));
  }
  render(answer);
  drawPrompt(sent);
  setState("done", `${task}: answered in ${Math.round(performance.now() - started)} ms.`);
}

function setState(name, message) {
  document.body.dataset.state = name;
  $("status").textContent = message;
  $("error").hidden = name !== "error";
}

function fail(message) {
  setState("error", "");
  $("error").textContent = message;
}

// -- drawing --------------------------------------------------------------------------------------

function clear() {
  $("overlay").replaceChildren();
  $("caption").replaceChildren();
  $("items").replaceChildren();
  const canvas = $("masks");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  $("raw").hidden = true;
}

/** Draw any task's answer: each part of the JSON that is present. */
function render(answer) {
  const [width, height] = answer.image_size;
  const overlay = $("overlay");
  overlay.setAttribute("viewBox", `0 0 ${width} ${height}`);
  overlay.setAttribute("preserveAspectRatio", "none");
  state.scale = Math.max(width, height) / 100; // marker size in image pixels
  const canvas = $("masks");
  canvas.width = width;
  canvas.height = height;
  const masks = [];
  if (answer.words) drawWords(answer.words);
  else if (answer.caption !== undefined) $("caption").textContent = answer.caption;
  const items = [];
  if (answer.box && !answer.regions) {
    items.push({ box: answer.box, label: answer.expression, score: answer.score, found: answer.found, mask: answer.mask });
  }
  for (const r of answer.regions || []) items.push({ box: r.box, label: r.caption, score: r.score });
  for (const d of answer.detections || []) items.push({ box: d.box, label: d.label, score: d.score, mask: d.mask });
  for (const t of answer.targets || []) items.push({ box: t.box, label: answer.query, score: t.score, mask: t.mask });
  for (const o of answer.outputs || []) items.push({ box: o.box, label: `${o.route}: ${o.text || o.caption || o.label || o.expression || ""}`, mask: o.mask });
  if (answer.text && answer.outputs) $("caption").textContent = answer.text;
  items.filter((item) => item.box).forEach((item, i) => {
    drawItem(item, i);
    if (item.mask) masks.push([item.mask, i]);
  });
  drawMasks(masks, width, height);
  $("json").textContent = JSON.stringify(answer, null, 1);
  $("raw").hidden = false;
}

/** The region a caption was asked about, in white under the answer: a dashed box or a ring. */
function drawPrompt(sent) {
  const parse = (text) => { try { return JSON.parse(text); } catch { return null; } };
  const box = parse(sent.box || "null");
  const point = parse(sent.point || "null");
  const layer = $("overlay").insertBefore(document.createElementNS(SVG, "g"), $("overlay").firstChild);
  layer.setAttribute("class", "prompt");
  if (Array.isArray(box) && box.length === 4) {
    svg("rect", { x: box[0], y: box[1], width: box[2] - box[0], height: box[3] - box[1] }, layer);
  }
  if (Array.isArray(point) && point.length === 2) {
    svg("circle", { cx: point[0], cy: point[1], r: state.scale * 1.6 }, layer);
  }
}

function svg(name, attributes, parent = $("overlay")) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  parent.append(element);
  return element;
}

function boxElement(box, i, cls, parent) {
  const [x0, y0, x1, y1] = box;
  const rect = svg("rect", { x: x0, y: y0, width: Math.max(x1 - x0, 0), height: Math.max(y1 - y0, 0), class: cls }, parent);
  rect.style.stroke = color(i);
  rect.dataset.index = i;
  return rect;
}

/** The trace: a chip per word under the image, its box and point over it, a line through the points. */
function drawWords(words) {
  const line = svg("polyline", { class: "trace", points: words.map((w) => w.point.join(",")).join(" ") });
  line.style.strokeWidth = "2";
  const group = svg("g", { class: "words" });
  words.forEach((word, i) => {
    const rect = boxElement(word.box, i, "box word-box", group);
    rect.style.fill = color(i);
    const dot = svg("circle", { cx: word.point[0], cy: word.point[1], r: state.scale, class: "point" }, group);
    dot.style.fill = color(i);
    dot.dataset.index = i;
    const chip = document.createElement("span");
    chip.className = "chip";
    chip.textContent = word.text;
    chip.style.borderColor = color(i);
    chip.dataset.index = i;
    chip.tabIndex = 0;
    $("caption").append(chip, " ");
    link([chip, rect, dot], "#caption .chip, #overlay .words [data-index]", i);
  });
}

/** A box with its label, listed under the image; pointing at either highlights both. */
function drawItem(item, i) {
  const group = svg("g", { class: "item" });
  const rect = boxElement(item.box, i, item.found === false ? "box missing" : "box", group);
  const label = svg("text", { x: item.box[0] + state.scale / 2, y: item.box[1] + state.scale * 3, class: "label" }, group);
  label.style.fontSize = `${state.scale * 3}px`;
  label.textContent = (item.label || "") + (item.found === false ? ": not found" : "");
  const entry = document.createElement("li");
  entry.dataset.index = i;
  entry.tabIndex = 0;
  entry.style.borderColor = color(i);
  // a referring score (with found) is a small number; a detection score is a probability
  const score = item.score === undefined ? "" : `${item.score.toFixed(item.found === undefined ? 2 : 3)} `;
  const verdict = item.found === false ? " (not found: the box is the best guess)" : "";
  entry.textContent = score + (item.label || "") + verdict;
  $("items").append(entry);
  link([entry, rect], "#items li, #overlay .item .box", i);
}

function link(elements, selector, i) {
  const highlight = (on) => {
    for (const element of document.querySelectorAll(selector)) {
      element.classList.toggle("lit", on && element.dataset.index === String(i));
    }
  };
  for (const element of elements) {
    element.addEventListener("pointerenter", () => highlight(true));
    element.addEventListener("pointerleave", () => highlight(false));
    element.addEventListener("focus", () => highlight(true));
    element.addEventListener("blur", () => highlight(false));
  }
}

/** Every mask into the canvas, in its item's color, half transparent. */
function drawMasks(masks, width, height) {
  if (!masks.length) return;
  const context = $("masks").getContext("2d");
  const image = context.createImageData(width, height);
  for (const [rle, i] of masks) {
    const [r, g, b] = rgb(i);
    decodeRle(rle).forEach((inside, pixel) => {
      if (!inside) return;
      image.data.set([r, g, b, 120], pixel * 4);
    });
  }
  context.putImageData(image, 0, 0);
}

init().catch((err) => fail(`The page could not start: ${err.message}`));
