// sa3 studio page: the form, live progress over server-sent events, results and history.
// Plain JavaScript, no libraries: the page works offline.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
// With an API key (server bound off loopback) the page is opened as /?key=KEY.
const apiKey = params.get("key") || sessionStorage.getItem("sa3-key") || "";
if (apiKey) sessionStorage.setItem("sa3-key", apiKey);

const state = {
  options: null,
  input: null,      // {init_audio: {...}, seconds, peaks, name}
  regions: [],      // [[start, end], ...] seconds, on the input audio
  job: null,        // id of the job being watched
  events: null,     // its EventSource
  pending: [],      // ids of a prompt list's jobs still to watch, in order
  loras: [],        // adapter specs "NAME:STRENGTH[@LO-HI]", in stacking order
  poll: null,       // and its fallback poll timer
};

function withKey(url) {
  return apiKey ? url + (url.includes("?") ? "&" : "?") + "key=" + encodeURIComponent(apiKey) : url;
}

async function api(method, path, body) {
  const headers = {};
  if (apiKey) headers["X-API-Key"] = apiKey;
  let data = body;
  if (body !== undefined && !(body instanceof Blob)) {
    headers["Content-Type"] = "application/json";
    data = JSON.stringify(body);
  }
  const response = await fetch(path, { method, headers, body: data });
  const text = await response.text();
  const json = text ? JSON.parse(text) : {};
  if (!response.ok) {
    const error = new Error(json.error || response.statusText);
    error.status = response.status;
    error.retryAfter = response.headers.get("Retry-After");
    throw error;
  }
  return json;
}

function say(text) { $("message").textContent = text || ""; }

// ---- waveforms ----------------------------------------------------------------------

function drawWave(canvas, peaks, regions = [], seconds = 0, played = 0) {
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  const style = getComputedStyle(document.documentElement);
  if (seconds > 0) {
    ctx.fillStyle = style.getPropertyValue("--region");
    for (const [start, end] of regions) {
      ctx.fillRect((start / seconds) * width, 0, ((end - start) / seconds) * width, height);
    }
  }
  const wave = style.getPropertyValue("--wave");
  const mid = height / 2;
  for (let x = 0; x < width; x++) {
    const peak = peaks.length ? peaks[Math.floor((x / width) * peaks.length)] : 0;
    const h = Math.max(1, Math.min(1, peak) * (height / 2 - 2));
    ctx.fillStyle = played > 0 && x / width <= played ? "#ffffff" : wave;
    ctx.fillRect(x, mid - h, 1, 2 * h);
  }
}

// A spectrogram ({width, height, data: base64 bytes, lowest band first}) in a dark-to-warm palette.
function drawSpectrogram(canvas, spec) {
  if (!spec) return;
  const bytes = Uint8Array.from(atob(spec.data), (c) => c.charCodeAt(0));
  canvas.width = spec.width;
  canvas.height = spec.height;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(spec.width, spec.height);
  for (let row = 0; row < spec.height; row++) {
    for (let x = 0; x < spec.width; x++) {
      const v = bytes[row * spec.width + x];
      const at = ((spec.height - 1 - row) * spec.width + x) * 4;  // the lowest band at the bottom
      image.data[at] = v;
      image.data[at + 1] = Math.round((v * v) / 255);
      image.data[at + 2] = Math.round(160 * Math.sqrt(v / 255));
      image.data[at + 3] = 255;
    }
  }
  ctx.putImageData(image, 0, 0);
}

// ---- the form -----------------------------------------------------------------------

const NUMBER_FIELDS = ["seconds", "steps", "num_outputs", "seed", "cfg", "apg", "loudness", "init_noise_level"];
const INTEGER_FIELDS = ["steps", "num_outputs", "seed"];
// The "Sampling and guidance" controls, generated from the fields /api/options describes (kind, bounds,
// choices, default, help): name -> label.
const ADVANCED = {
  sampler: "Sampler", cfg_rescale: "CFG rescale", cfg_norm_threshold: "CFG norm threshold",
  cfg_interval: "CFG interval (sigma)", shift: "Schedule shift", headroom: "Headroom (s)",
};
const MODEL_DEFAULT = "model's default";

function fieldOf(name) { return state.options.fields.find((f) => f.name === name); }

function numberInput(id, f) {
  const input = document.createElement("input");
  input.id = id;
  input.type = "number";
  input.step = f.kind === "int" ? "1" : "any";
  if (f.minimum !== null && f.minimum !== undefined) input.min = f.minimum;
  if (f.maximum !== null && f.maximum !== undefined) input.max = f.maximum;
  return input;
}

function buildAdvanced() {
  const box = $("advanced-fields");
  for (const [name, text] of Object.entries(ADVANCED)) {
    const f = fieldOf(name);
    if (!f) continue;
    const label = document.createElement("label");
    label.append(text);
    label.title = f.help;
    if (f.kind === "choice") {
      const select = document.createElement("select");
      select.id = name;
      const own = document.createElement("option");
      own.value = "";
      own.textContent = f.default === MODEL_DEFAULT ? "model's" : "default";
      select.appendChild(own);
      fillSelect(select, f.choices);
      label.appendChild(select);
    } else if (f.kind === "interval") {
      const pair = document.createElement("span");
      pair.className = "pair";
      pair.append(numberInput(`${name}_lo`, f), numberInput(`${name}_hi`, f));
      label.appendChild(pair);
    } else if (f.kind === "shift") {
      const input = document.createElement("input");
      input.id = name;
      input.placeholder = "model (e.g. flux:alpha_min=2,alpha_max=2)";
      input.maxLength = f.max_chars || 200;
      label.appendChild(input);
    } else {
      label.appendChild(numberInput(name, f));
    }
    box.appendChild(label);
  }
  resetAdvanced();
}

// Every advanced control at its field's default.
function resetAdvanced() {
  const values = {};
  for (const name of Object.keys(ADVANCED)) {
    const f = fieldOf(name);
    if (f) values[name] = f.default === MODEL_DEFAULT ? null : f.default;
  }
  setAdvanced(values);
}

function setAdvanced(settings) {
  for (const name of Object.keys(ADVANCED)) {
    const f = fieldOf(name);
    if (!f) continue;
    const value = settings[name];
    if (f.kind === "interval") {
      const [lo, hi] = value || f.default;
      $(`${name}_lo`).value = lo;
      $(`${name}_hi`).value = hi;
    } else if (f.kind === "shift") {
      $(name).value = value && value !== "model" ? value : "";
    } else {
      $(name).value = value === null || value === undefined ? "" : value;
    }
  }
}

function advancedInUse(settings) {
  return Object.keys(ADVANCED).some((name) => {
    const f = fieldOf(name);
    const value = settings[name];
    if (!f || value === null || value === undefined || f.default === MODEL_DEFAULT) return false;
    return JSON.stringify(value) !== JSON.stringify(f.default);
  });
}

function readAdvanced(s) {
  for (const name of Object.keys(ADVANCED)) {
    const f = fieldOf(name);
    if (!f) continue;
    if (f.kind === "interval") {
      const lo = $(`${name}_lo`).value.trim(), hi = $(`${name}_hi`).value.trim();
      if (lo !== "" || hi !== "") s[name] = [lo === "" ? f.minimum : parseFloat(lo), hi === "" ? f.maximum : parseFloat(hi)];
    } else if (f.kind === "choice" || f.kind === "shift") {
      const value = $(name).value.trim();
      if (value !== "") s[name] = value;
    } else {
      const raw = $(name).value.trim();
      if (raw !== "") s[name] = f.kind === "int" ? parseInt(raw, 10) : parseFloat(raw);
    }
  }
}

function readForm() {
  const s = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value || null,
    model: $("model").value,
    decoder: $("decoder").value || null,
    format: $("format").value,
  };
  for (const name of NUMBER_FIELDS) {
    const raw = $(name).value.trim();
    if (raw === "") continue;
    s[name] = INTEGER_FIELDS.includes(name) ? parseInt(raw, 10) : parseFloat(raw);
  }
  readAdvanced(s);
  if (state.loras.length) s.loras = state.loras.slice();
  if (state.input) {
    s.init_audio = state.input.init_audio;
    s.inpaint = state.regions.map(([a, b]) => [round(a), round(b)]);
  } else {
    delete s.init_noise_level;
  }
  return s;
}

function round(x) { return Math.round(x * 1000) / 1000; }

function fillForm(settings) {
  $("prompt").value = settings.prompt || "";
  $("negative_prompt").value = settings.negative_prompt || "";
  $("model").value = settings.model;
  $("decoder").value = settings.decoder || "";
  $("format").value = settings.format || "wav16";
  for (const name of NUMBER_FIELDS) {
    const value = settings[name];
    $(name).value = value === null || value === undefined ? "" : value;
  }
  setAdvanced(settings);
  state.loras = (settings.loras || []).slice();
  showLoras();
  if (advancedInUse(settings)) $("advanced").open = true;  // show what the reused settings set
  state.regions = (settings.inpaint || []).map((r) => r.slice());
  if (settings.init_audio) {
    // The input itself is shown again when it is a past result (an upload's waveform is not kept).
    const source = settings.init_audio;
    state.input = { init_audio: source, seconds: settings.seconds, peaks: [], name: describeInput(source) };
    if (source.job) {
      api("GET", `/api/jobs/${source.job}`).then((job) => {
        const output = job.outputs[source.output || 0];
        if (output && state.input && state.input.init_audio === source) {
          state.input.peaks = output.peaks;
          showInput();
        }
      }).catch(() => {});
    }
  } else {
    state.input = null;
  }
  showInput();
}

function describeInput(source) {
  return source.upload ? `upload ${source.upload}` : `job ${source.job}, output ${(source.output || 0) + 1}`;
}

function showInput() {
  const input = state.input;
  $("input-box").hidden = !input;
  $("input-name").textContent = input
    ? `${input.name} (${input.seconds.toFixed(2)} s): ${state.regions.length ? "inpainting" : "audio-to-audio"}`
    : "none: text-to-audio";
  if (!input) return;
  drawWave($("input-wave"), input.peaks, state.regions, input.seconds);
  const list = $("regions");
  list.textContent = "";
  state.regions.forEach(([start, end], i) => {
    const item = document.createElement("li");
    item.textContent = `${start.toFixed(2)}–${end.toFixed(2)} s`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = "remove this region";
    remove.onclick = () => { state.regions.splice(i, 1); showInput(); };
    item.appendChild(remove);
    list.appendChild(item);
  });
}

function setInput(init_audio, seconds, peaks, name) {
  state.input = { init_audio, seconds, peaks, name };
  state.regions = [];
  // Same length as the input: the regions are then inside it (inpainting, not continuation).
  $("seconds").value = round(Math.min(seconds, state.options.limits.max_seconds));
  showInput();
}

// Drag on the input waveform to add a region to regenerate.
function setUpRegionSelection() {
  const canvas = $("input-wave");
  let start = null;
  const seconds = (event) => {
    const box = canvas.getBoundingClientRect();
    const x = Math.max(0, Math.min(box.width, event.clientX - box.left));
    return (x / box.width) * state.input.seconds;
  };
  canvas.addEventListener("mousedown", (event) => { if (state.input) start = seconds(event); });
  canvas.addEventListener("mousemove", (event) => {
    if (start === null) return;
    const now = seconds(event);
    drawWave(canvas, state.input.peaks, [...state.regions, [Math.min(start, now), Math.max(start, now)]],
      state.input.seconds);
  });
  window.addEventListener("mouseup", (event) => {
    if (start === null) return;
    const end = seconds(event);
    const region = [Math.min(start, end), Math.max(start, end)];
    start = null;
    if (region[1] - region[0] > state.input.seconds / 200) state.regions.push(region);
    showInput();
  });
}

// ---- jobs ---------------------------------------------------------------------------

async function submit(settings) {
  say("");
  state.pending = [];
  try {
    const job = await api("POST", "/api/jobs", settings);
    watch(job);
  } catch (error) {
    say(error.status === 429 ? `The queue is full; try again in ${error.retryAfter} s.` : error.message);
  }
}

function watch(job) {
  stopWatching();
  state.job = job.id;
  $("progress-box").hidden = false;
  $("cancel").hidden = false;
  showProgress(job);
  upsertJob(job);
  const update = (current) => {
    if (state.job !== current.id) return;
    showProgress(current);
    upsertJob(current);
    if (!["queued", "running"].includes(current.status)) finishWatching(current);
  };
  const events = new EventSource(withKey(`/api/jobs/${job.id}/events`));
  state.events = events;
  events.addEventListener("job", (event) => update(JSON.parse(event.data)));
  // The stream closes when the job ends; a slow poll covers a stream that drops or stalls.
  events.onerror = () => events.close();
  state.poll = setInterval(() => {
    api("GET", `/api/jobs/${job.id}`).then(update).catch((error) => say(error.message));
  }, 1500);
}

function stopWatching() {
  if (state.events) state.events.close();
  clearInterval(state.poll);
  state.events = state.poll = null;
}

function showProgress(job) {
  const progress = $("progress");
  if (job.status === "queued") {
    progress.removeAttribute("value");
    $("stage").textContent = `queued (position ${(job.queue_position || 0) + 1})`;
  } else if (job.status === "running") {
    progress.max = job.steps || 1;
    progress.value = job.step || 0;
    $("stage").textContent = job.stage === "sampling" ? `sampling: step ${job.step}/${job.steps}` : job.stage;
  }
  $("preview-box").hidden = !job.preview || job.status !== "running";
  if (job.preview && job.preview.step !== state.previewStep) {
    state.previewStep = job.preview.step;
    drawSpectrogram($("preview"), job.preview.spectrogram);
    $("preview-label").textContent = `preview at step ${job.preview.step}/${job.preview.steps}`;
  }
}

function finishWatching(job) {
  stopWatching();
  state.job = null;
  $("progress-box").hidden = true;
  $("preview-box").hidden = true;
  state.previewStep = null;
  $("cancel").hidden = true;
  if (job.status === "failed") say(`Failed: ${job.error}`);
  else if (job.status === "cancelled") say("Cancelled.");
  for (const warning of job.warnings || []) say(`Warning: ${warning}`);
  const next = state.pending.shift();  // a prompt list: watch its next job
  if (next) api("GET", `/api/jobs/${next}`).then(watch).catch((e) => say(e.message));
}

async function submitList(file) {
  say("");
  try {
    const defaults = readForm();
    delete defaults.prompt;
    const { jobs } = await api("POST", "/api/prompt-lists", { text: await file.text(), defaults });
    for (const job of jobs) upsertJob(job);
    state.pending = jobs.slice(1).map((j) => j.id);
    watch(jobs[0]);
    say(`Queued ${jobs.length} job${jobs.length === 1 ? "" : "s"} from ${file.name}.`);
  } catch (error) {
    say(error.status === 429 ? `The queue has no room for the list; try again in ${error.retryAfter} s.` : error.message);
  }
  $("prompt-list").value = "";
}

function summary(s) {
  const parts = [s.mode || (s.init_audio ? "audio input" : "text-to-audio"), s.model, `${s.seconds} s`,
    `${s.steps} steps`, `seed ${s.seed}`, `cfg ${s.cfg}`];
  if (s.sampler) parts.push(s.sampler);
  if (s.cfg !== 1) parts.push(`apg ${s.apg}`);
  if (s.cfg_rescale) parts.push(`rescale ${s.cfg_rescale}`);
  if (s.cfg_norm_threshold) parts.push(`norm threshold ${s.cfg_norm_threshold}`);
  if (s.cfg_interval && (s.cfg_interval[0] !== 0 || s.cfg_interval[1] !== 1)) {
    parts.push(`guided at sigma ${s.cfg_interval[0]}–${s.cfg_interval[1]}`);
  }
  if (s.shift && s.shift !== "model") parts.push(`shift ${s.shift}`);
  if (s.headroom) parts.push(`headroom ${s.headroom} s`);
  if (s.loras && s.loras.length) parts.push("LoRA " + s.loras.join(", "));
  if (s.negative_prompt) parts.push(`not "${s.negative_prompt}"`);
  if (s.init_audio) parts.push(`from ${describeInput(s.init_audio)}`);
  if (s.inpaint && s.inpaint.length) parts.push("regions " + s.inpaint.map(([a, b]) => `${a}–${b}`).join(", "));
  if (s.loudness !== null && s.loudness !== undefined) parts.push(`${s.loudness} LUFS`);
  return parts.join(" · ");
}

function renderJob(job, article) {
  article.dataset.id = job.id;
  article.dataset.status = job.status;
  article.querySelector(".prompt").textContent = job.settings.prompt || "(unconditional)";
  article.querySelector(".status").textContent =
    job.status === "done" ? new Date(job.created * 1000).toLocaleString() : job.status;
  article.querySelector(".summary").textContent = summary(job.settings);
  article.querySelector(".error").textContent = job.status === "failed" ? job.error : "";
  const outputs = article.querySelector(".outputs");
  if (outputs.childElementCount !== job.outputs.length) {
    outputs.textContent = "";
    for (const output of job.outputs) outputs.appendChild(renderOutput(job, output));
  }
  article.querySelector(".variations").disabled = job.status !== "done";
  article.querySelector(".delete").disabled = ["queued", "running"].includes(job.status);
  article.querySelector(".variations").onclick = () => {
    const seed = Math.floor(Math.random() * 2 ** 31);
    submit({ ...settingsOf(job), seed });
  };
  article.querySelector(".reuse").onclick = () => { fillForm(settingsOf(job)); window.scrollTo(0, 0); };
  article.querySelector(".delete").onclick = async () => {
    try {
      await api("DELETE", `/api/jobs/${job.id}`);
      article.remove();
      $("history-empty").hidden = $("history").childElementCount > 0;
    } catch (error) { say(error.message); }
  };
}

// The settings a job was submitted with (what the server added after the run left out).
function settingsOf(job) {
  const s = {};
  for (const name of Object.keys(state.options.defaults)) s[name] = job.settings[name];
  return s;
}

function renderOutput(job, output) {
  const node = $("output-template").content.firstElementChild.cloneNode(true);
  const url = withKey(output.url);
  const audio = node.querySelector("audio");
  audio.src = url;
  const canvas = node.querySelector("canvas.wave");
  drawSpectrogram(node.querySelector("canvas.spectrogram"), output.spectrogram);
  const draw = () => drawWave(canvas, output.peaks, [], 0, audio.duration ? audio.currentTime / audio.duration : 0);
  audio.addEventListener("timeupdate", draw);
  canvas.addEventListener("click", (event) => {
    const box = canvas.getBoundingClientRect();
    if (audio.duration) audio.currentTime = ((event.clientX - box.left) / box.width) * audio.duration;
  });
  const download = node.querySelector(".download");
  download.href = url;
  const suffix = { flac: "flac", mp3: "mp3", ogg: "ogg", opus: "opus" }[job.settings.format] || "wav";
  download.download = `sa3_${job.id}_${output.index + 1}.${suffix}`;
  node.querySelector(".use-input").onclick = () => {
    setInput({ job: job.id, output: output.index }, job.settings.seconds, output.peaks,
      `job ${job.id}, output ${output.index + 1}`);
    window.scrollTo(0, 0);
  };
  node.querySelector(".levels").textContent =
    `seed ${output.seed} · peak ${output.peak_dbfs === null ? "-inf" : output.peak_dbfs} dBFS`;
  requestAnimationFrame(draw);
  return node;
}

function upsertJob(job) {
  const history = $("history");
  let article = history.querySelector(`.job[data-id="${job.id}"]`);
  if (!article) {
    article = $("job-template").content.firstElementChild.cloneNode(true);
    history.prepend(article);
  }
  renderJob(job, article);
  $("history-empty").hidden = true;
}

async function loadHistory() {
  const q = $("search").value;
  try {
    const { jobs } = await api("GET", `/api/jobs?limit=200&q=${encodeURIComponent(q)}`);
    const history = $("history");
    history.textContent = "";
    for (const job of jobs.reverse()) upsertJob(job);
    $("history-empty").hidden = jobs.length > 0;
  } catch (error) { say(error.message); }
}

// ---- start ----------------------------------------------------------------------------

function fillSelect(select, values) {
  for (const value of values) {
    const option = document.createElement("option");
    option.value = option.textContent = value;
    select.appendChild(option);
  }
}

// LoRA adapters: names the server offers, each with a strength and an optional noise interval.
function setUpLoras(names) {
  $("lora-box").hidden = names.length === 0;
  fillSelect($("lora-name"), names);
  $("lora-add").onclick = () => {
    const strength = $("lora-strength").value.trim() || "1";
    const lo = $("lora-lo").value.trim(), hi = $("lora-hi").value.trim();
    let spec = `${$("lora-name").value}:${strength}`;
    if (lo !== "" || hi !== "") spec += `@${lo || "0"}-${hi || "1"}`;
    state.loras.push(spec);
    showLoras();
  };
  showLoras();
}

function showLoras() {
  const list = $("lora-list");
  list.textContent = "";
  state.loras.forEach((spec, i) => {
    const item = document.createElement("li");
    item.textContent = spec + " ";
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Remove";
    remove.onclick = () => { state.loras.splice(i, 1); showLoras(); };
    item.appendChild(remove);
    list.appendChild(item);
  });
}

async function start() {
  try {
    state.options = await api("GET", "/api/options");
  } catch (error) {
    say(`Cannot reach the server: ${error.message}`);
    return;
  }
  const { options } = state;
  fillSelect($("model"), options.models);
  fillSelect($("decoder"), options.decoders);
  fillSelect($("format"), options.formats);
  buildAdvanced();
  setUpLoras(options.loras || []);
  const prompt = options.fields.find((f) => f.name === "prompt");
  if (prompt) $("prompt").title = prompt.help;
  $("seconds").max = options.limits.max_seconds;
  $("steps").max = options.limits.max_steps;
  $("num_outputs").max = options.limits.max_batch;
  document.querySelector("header a").href = withKey("/api/openapi.json");
  $("server-status").textContent = `limits: ${options.limits.max_seconds} s, ${options.limits.max_steps} steps`;

  $("form").addEventListener("submit", (event) => { event.preventDefault(); submit(readForm()); });
  $("dice").onclick = () => { $("seed").value = Math.floor(Math.random() * 2 ** 31); };
  $("cancel").onclick = () => { if (state.job) api("POST", `/api/jobs/${state.job}/cancel`).catch((e) => say(e.message)); };
  $("clear-input").onclick = () => { state.input = null; state.regions = []; $("upload").value = ""; showInput(); };
  $("clear-regions").onclick = () => { state.regions = []; showInput(); };
  $("upload").addEventListener("change", async () => {
    const file = $("upload").files[0];
    if (!file) return;
    say("Uploading…");
    try {
      const upload = await api("POST", "/api/uploads", file);
      setInput({ upload: upload.id }, upload.seconds, upload.peaks, file.name);
      say("");
    } catch (error) { say(error.message); $("upload").value = ""; }
  });
  $("prompt-list").addEventListener("change", () => { if ($("prompt-list").files[0]) submitList($("prompt-list").files[0]); });
  let searchTimer = null;
  $("search").addEventListener("input", () => { clearTimeout(searchTimer); searchTimer = setTimeout(loadHistory, 250); });
  setUpRegionSelection();
  await loadHistory();
  // A job still running from before a reload: watch it again.
  const active = [...$("history").querySelectorAll(".job")].find((a) => ["queued", "running"].includes(a.dataset.status));
  if (active) api("GET", `/api/jobs/${active.dataset.id}`).then(watch).catch(() => {});
  document.body.dataset.ready = "true";
}

start();
