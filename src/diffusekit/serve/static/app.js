// diffusekit web page: plain JavaScript, talks to the server's own job API (/v1) and reads lists from /sdapi/v1.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { job: null, source: null, lastSeed: null, image: null };
window.dkLog = [];  // progress events seen (kept for the browser test and for debugging)

async function getJSON(url, options) {
  const response = await fetch(url, options);
  const text = await response.text();
  let body;
  try { body = JSON.parse(text); } catch (e) { body = { detail: text }; }
  if (!response.ok) {
    const detail = Array.isArray(body.detail)
      ? body.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("\n")
      : body.detail;
    throw new Error(`${response.status}: ${detail}`);
  }
  return body;
}

function fillSelect(select, items, selected) {
  select.replaceChildren(...items.map(([value, label]) => {
    const option = new Option(label, value);
    option.selected = value === selected;
    return option;
  }));
}

async function loadLists() {
  const [models, samplers, schedulers] = await Promise.all([
    getJSON("/v1/models"), getJSON("/sdapi/v1/samplers"), getJSON("/sdapi/v1/schedulers")]);
  fillSelect($("model"), models.models.map((m) => [m.name, m.name + (m.loaded ? " (loaded)" : "")]), models.default);
  fillSelect($("sampler_name"), samplers.map((s) => [s.name, s.name]), "Euler a");
  fillSelect($("scheduler"), schedulers.map((s) => [s.name, s.label]), "automatic");
  if (models.lora_loading && models.loras.length) {
    $("lora-row").hidden = false;
    $("loras").replaceChildren(...models.loras.map((name) => {
      const chip = document.createElement("span");
      chip.className = "chip";
      chip.textContent = name;
      chip.onclick = () => { $("prompt").value += ` <lora:${name}:1>`; };
      return chip;
    }));
  }
  $("server-status").textContent = `${models.models.length} models`;
}

// ------------------------------------------------------------------ img2img image and mask painting

function showImage(image) {
  state.image = image;
  const w = image.naturalWidth, h = image.naturalHeight;
  for (const canvas of [$("image-canvas"), $("mask-canvas")]) { canvas.width = w; canvas.height = h; }
  $("image-canvas").getContext("2d").drawImage(image, 0, 0);
  $("canvas-box").hidden = false;
  $("img2img-controls").hidden = false;
  $("width").value = Math.max(8, Math.round(w / 8) * 8);
  $("height").value = Math.max(8, Math.round(h / 8) * 8);
}

$("init-image").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (!file) return;
  const image = new Image();
  image.onload = () => showImage(image);
  image.src = URL.createObjectURL(file);
});

(function maskPainting() {
  const canvas = $("mask-canvas");
  let painting = false;
  const paint = (event) => {
    const rect = canvas.getBoundingClientRect();
    const x = (event.clientX - rect.left) * canvas.width / rect.width;
    const y = (event.clientY - rect.top) * canvas.height / rect.height;
    const r = Number($("brush").value) * canvas.width / rect.width / 2;
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "rgb(80, 200, 255)";
    ctx.beginPath();
    ctx.arc(x, y, Math.max(r, 0.5), 0, 2 * Math.PI);
    ctx.fill();
  };
  canvas.addEventListener("pointerdown", (e) => { painting = true; canvas.setPointerCapture(e.pointerId); paint(e); });
  canvas.addEventListener("pointermove", (e) => { if (painting) paint(e); });
  canvas.addEventListener("pointerup", () => { painting = false; });
})();

$("mask-clear").onclick = () => {
  const canvas = $("mask-canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
};
$("image-clear").onclick = () => {
  state.image = null;
  $("init-image").value = "";
  $("canvas-box").hidden = true;
  $("img2img-controls").hidden = true;
};

function maskDataURL() {
  // painted pixels -> white, the rest black (A1111's mask convention: white = repaint); null when nothing painted
  const source = $("mask-canvas");
  const data = source.getContext("2d").getImageData(0, 0, source.width, source.height);
  let painted = false;
  for (let i = 0; i < data.data.length; i += 4) {
    const on = data.data[i + 3] > 0;
    painted = painted || on;
    data.data[i] = data.data[i + 1] = data.data[i + 2] = on ? 255 : 0;
    data.data[i + 3] = 255;
  }
  if (!painted) return null;
  const out = document.createElement("canvas");
  out.width = source.width; out.height = source.height;
  out.getContext("2d").putImageData(data, 0, 0);
  return out.toDataURL("image/png");
}

// ------------------------------------------------------------------ jobs

function requestBody() {
  const number = (id) => Number($(id).value);
  const body = {
    model: $("model").value, prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    sampler_name: $("sampler_name").value, scheduler: $("scheduler").value, steps: number("steps"),
    cfg_scale: number("cfg_scale"), width: number("width"), height: number("height"),
    batch_size: number("batch_size"), seed: number("seed"),
  };
  const interval = $("guidance_interval").value.trim();  // "lo-hi"; the server checks the numbers
  if (interval) body.guidance_interval = interval.split("-").map(Number);
  if (number("deep_cache") > 1) body.deep_cache = number("deep_cache");
  const freeu = $("freeu").value.trim();  // "s1, s2, b1, b2"; the server checks the numbers
  if (freeu) body.freeu = freeu.split(/[\s,]+/).filter(Boolean).map(Number);
  if (state.image) {
    body.init_images = [$("image-canvas").toDataURL("image/png")];
    body.denoising_strength = number("denoising_strength");
    const mask = maskDataURL();
    if (mask) body.mask = mask;
  }
  return body;
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").disabled = !busy;
}

function showProgress(data) {
  window.dkLog.push({ state: data.state, step: data.step, steps: data.steps, preview: Boolean(data.preview) });
  $("progress").value = data.progress;
  if (data.state === "queued") {
    $("progress-text").textContent = `queued (position ${data.position + 1})`;
  } else if (data.state === "running") {
    $("progress-text").textContent = data.steps ? `step ${data.step} / ${data.steps}` : "loading model…";
  }
  if (data.preview) {
    $("preview").src = data.preview;
    $("preview").hidden = false;
  }
}

function addResults(job) {
  job.images.forEach((url, i) => {
    const card = document.createElement("div");
    card.className = "card";
    const image = document.createElement("img");
    image.src = url;
    image.alt = `result ${i + 1}`;
    const text = document.createElement("pre");
    text.className = "parameters";
    text.textContent = job.infotexts[i];
    const link = document.createElement("a");
    link.href = url;
    link.download = `diffusekit-${job.seeds[i]}.png`;
    link.textContent = "Download PNG";
    const reuse = document.createElement("button");
    reuse.type = "button";
    reuse.textContent = "Use seed";
    reuse.onclick = () => { $("seed").value = job.seeds[i]; };
    card.append(image, text, link, " ", reuse);
    $("gallery").prepend(card);
  });
  if (job.seeds.length) state.lastSeed = job.seeds[0];
}

function finish(job) {
  if (state.source) state.source.close();
  state.source = null;
  state.job = null;
  setBusy(false);
  $("progress").value = job.state === "done" ? 1 : 0;
  $("progress-text").textContent = job.state === "done" ? "done" : job.state + (job.error ? `: ${job.error}` : "");
  if (job.error) $("error").textContent = job.error;
  addResults(job);
  $("model").querySelectorAll("option").forEach((o) => {
    o.textContent = o.value + (o.value === job.model ? " (loaded)" : "");
  });
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("error").textContent = "";
  setBusy(true);
  try {
    const job = await getJSON("/v1/jobs", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(requestBody()),
    });
    state.job = job.id;
    $("progress-text").textContent = "queued";
    const source = new EventSource(job.events);
    state.source = source;
    source.addEventListener("progress", (e) => showProgress(JSON.parse(e.data)));
    source.addEventListener("done", (e) => finish(JSON.parse(e.data)));
    source.onerror = () => {
      if (state.source !== source) return;
      source.close();
      getJSON(job.url).then((data) => { if (data.state !== "queued" && data.state !== "running") finish(data); });
    };
  } catch (error) {
    $("error").textContent = error.message;
    setBusy(false);
  }
});

$("cancel").onclick = async () => {
  if (state.job) await getJSON(`/v1/jobs/${state.job}`, { method: "DELETE" }).catch(() => {});
};
$("seed-random").onclick = () => { $("seed").value = -1; };
$("seed-reuse").onclick = () => { if (state.lastSeed !== null) $("seed").value = state.lastSeed; };

loadLists().catch((error) => { $("error").textContent = `could not load lists: ${error.message}`; });
