// BLIP-2 web page: choose or drop an image, see its caption, ask questions, rank texts.
// Plain JavaScript, no build step; talks to the JSON API of blip2.serve with multipart uploads.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, tasks: [] };

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// Disable the form's button and show its spinner while `work` runs; errors go to the alert box.
async function busy(button, spinner, work) {
  button.disabled = true;
  spinner.hidden = false;
  document.body.setAttribute("aria-busy", "true");
  try {
    showError("");
    await work();
  } catch (err) {
    showError(err.message || String(err));
  } finally {
    spinner.hidden = true;
    button.disabled = !state.file;
    document.body.removeAttribute("aria-busy");
  }
}

async function post(path, fields) {
  const form = new FormData();
  form.append("image", state.file, state.file.name || "image");
  for (const [key, value] of fields) form.append(key, value);
  let response;
  try {
    response = await fetch(path, { method: "POST", body: form });
  } catch (err) {
    throw new Error(`could not reach the server (${err.message})`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = null;
  }
  if (!response.ok) {
    const why = body && body.error ? body.error : response.statusText;
    throw new Error(`${response.status}: ${why}`);
  }
  return body;
}

async function caption() {
  if (!state.file) return;
  $("caption").textContent = "";
  await busy($("recaption"), $("caption-busy"), async () => {
    const prompt = $("prompt").value.trim();
    const result = await post("/caption", prompt ? [["prompt", prompt]] : []);
    $("caption").textContent = result.caption || "(empty caption)";
  });
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question) {
    showError("type a question first");
    return;
  }
  await busy($("ask"), $("ask-busy"), async () => {
    const result = await post("/answer", [["question", question]]);
    for (const qa of result.answers) {
      const item = document.createElement("li");
      const q = document.createElement("span");
      q.className = "q";
      q.textContent = `${qa.question} → `;
      const a = document.createElement("span");
      a.className = "a";
      a.textContent = qa.answer || "(no answer)";
      item.append(q, a);
      $("answers").prepend(item);
    }
    $("question").value = "";
  });
}

async function rank(event) {
  event.preventDefault();
  const texts = $("texts").value.split("\n").map((t) => t.trim()).filter((t) => t);
  if (!texts.length) {
    showError("write at least one text to rank, one per line");
    return;
  }
  await busy($("rank"), $("rank-busy"), async () => {
    const result = await post("/retrieve", texts.map((t) => ["texts", t]));
    $("ranking").replaceChildren(
      ...result.ranking.map((r) => {
        const item = document.createElement("li");
        item.textContent = r.text;
        const score = document.createElement("span");
        score.className = "score";
        score.textContent = r.score.toFixed(3);
        item.append(score);
        return item;
      }),
    );
  });
}

function choose(file) {
  if (!file) return;
  state.file = file;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.alt = file.name || "the chosen image";
  preview.hidden = false;
  $("drop-hint").textContent = `${file.name || "image"}: choose or drop another`;
  $("answers").replaceChildren();
  $("ranking").replaceChildren();
  for (const id of ["recaption", "ask", "rank"]) $(id).disabled = false;
  caption();
}

async function loadStatus() {
  try {
    const health = await (await fetch("/healthz")).json();
    state.tasks = health.tasks;
    $("status").textContent = `${health.model} · ${health.tasks.join(", ")}`;
    $("ask-section").hidden = !health.tasks.includes("answer");
    $("rank-section").hidden = !health.tasks.includes("retrieve");
    if (!health.tasks.includes("answer")) $("prompt").hidden = true; // stage-1 models caption without a prompt
  } catch (err) {
    $("status").textContent = "server unreachable";
  }
}

function setup() {
  const drop = $("drop");
  $("preview").addEventListener("error", () => ($("preview").hidden = true)); // not an image: no broken icon
  $("file").addEventListener("change", (e) => choose(e.target.files[0]));
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    choose(e.dataTransfer.files[0]);
  });
  $("caption-form").addEventListener("submit", (e) => {
    e.preventDefault();
    caption();
  });
  $("ask-form").addEventListener("submit", ask);
  $("rank-form").addEventListener("submit", rank);
  loadStatus();
}

document.addEventListener("DOMContentLoaded", setup);
