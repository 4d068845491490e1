// alignloop web page: POST /generate, show the k best images, POST /feedback on a thumbs click.
// No framework and no external asset: the page must work offline, under a strict Content-Security-Policy.
"use strict";

const $ = (id) => document.getElementById(id);

function userId() {
  let id = localStorage.getItem("alignloop.user_id");
  if (!id) {
    id = "web-" + Array.from(crypto.getRandomValues(new Uint8Array(8)), (b) => b.toString(16).padStart(2, "0")).join("");
    localStorage.setItem("alignloop.user_id", id);
  }
  return id;
}

function intOrNull(value) {
  return value.trim() === "" ? null : Number(value);
}

// An error body is {"error": "...", "fields": [...]} (4xx) or {"error": "...", "reason": "..."} (401).
async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch (_) { /* not JSON */ }
  return `HTTP ${response.status}`;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setBusy(busy, n) {
  $("generate").disabled = busy;
  $("progress").hidden = !busy;
  if (!busy) return clearInterval(setBusy.timer);
  const started = performance.now();
  const tick = () => {
    const s = ((performance.now() - started) / 1000).toFixed(1);
    $("progress-text").textContent = `Sampling ${n} candidates and ranking them… ${s} s`;
  };
  tick();
  setBusy.timer = setInterval(tick, 100);
}

async function generate(event) {
  event.preventDefault();
  showError("");
  const body = {
    prompt: $("prompt").value,
    n: Number($("n").value),
    k: Number($("k").value),
    user_id: $("user-id").value.trim() || userId(),
  };
  const steps = intOrNull($("steps").value);
  const seed = intOrNull($("seed").value);
  if (steps !== null) body.steps = steps;
  if (seed !== null) body.seed = seed;
  setBusy(true, body.n);
  try {
    const response = await fetch("/generate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (!response.ok) return showError(await errorMessage(response));
    render(await response.json(), body.user_id);
  } catch (err) {
    showError("The server could not be reached: " + err.message);
  } finally {
    setBusy(false);
  }
}

function render(result, user) {
  const t = result.timings;
  $("summary").hidden = false;
  $("summary").textContent = `Best ${result.k} of ${result.n} (seed ${result.seed}, arm ${result.arm}, ` +
    `${result.steps} steps) in ${(t.total_ms / 1000).toFixed(2)} s: sampling ${t.sampling_ms.toFixed(0)} ms, ` +
    `scoring ${t.scoring_ms.toFixed(0)} ms.`;
  const grid = $("grid");
  grid.replaceChildren(...result.images.map((image) => card(image, user)));
}

function card(image, user) {
  const el = document.createElement("article");
  el.className = "card";
  el.dataset.imageId = image.image_id;
  el.dataset.rank = image.rank;

  const img = document.createElement("img");
  img.src = "data:image/png;base64," + image.image;
  img.alt = `candidate ranked ${image.rank}`;

  const meta = document.createElement("div");
  meta.className = "meta";
  const rank = document.createElement("span");
  rank.textContent = `#${image.rank}`;
  const reward = document.createElement("span");
  reward.className = "reward";
  reward.textContent = `reward ${image.reward.toFixed(3)}`;
  meta.append(rank, reward);

  const state = document.createElement("div");
  state.className = "vote-state";
  state.textContent = "not voted";

  const votes = document.createElement("div");
  votes.className = "votes";
  const up = voteButton("up", "\u25B2", "Thumbs up");
  const down = voteButton("down", "\u25BC", "Thumbs down");
  votes.append(up, down);
  for (const button of [up, down]) {
    button.addEventListener("click", () => vote(image, button.dataset.vote, user, { up, down, state }));
  }
  el.append(img, meta, votes, state);
  return el;
}

function voteButton(vote, glyph, label) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "vote " + vote;
  b.dataset.vote = vote;
  b.setAttribute("aria-label", label);
  b.setAttribute("aria-pressed", "false");
  b.textContent = `${glyph} ${vote}`;
  return b;
}

async function vote(image, choice, user, ui) {
  ui.up.disabled = ui.down.disabled = true;
  ui.state.className = "vote-state";
  ui.state.textContent = "sending…";
  try {
    const response = await fetch("/feedback", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ feedback_token: image.feedback_token, vote: choice, user_id: user }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    const result = await response.json();
    ui.up.setAttribute("aria-pressed", String(choice === "up"));
    ui.down.setAttribute("aria-pressed", String(choice === "down"));
    ui.state.textContent = result.status === "duplicate" ? `voted ${choice} (already recorded)` : `voted ${choice}`;
    ui.state.dataset.state = "voted-" + choice;
  } catch (err) {
    ui.state.className = "vote-state failed";
    ui.state.textContent = "vote not recorded: " + err.message;
    ui.state.dataset.state = "failed";
  } finally {
    ui.up.disabled = ui.down.disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("user-id").value = userId();
  $("n").addEventListener("input", () => { $("k").max = $("n").value; });
  $("generate-form").addEventListener("submit", generate);
});
