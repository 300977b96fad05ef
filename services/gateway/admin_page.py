"""The /admin dashboard: one self-contained HTML page (no external assets, it must work
offline) that polls /admin/scheduler every second and draws the KV block pool as a grid,
one cell per block coloured by the request that owns it, plus the request and executor
tables. Kept as a Python string so it ships inside the package with no data-file setup.

All data is inserted with textContent, never innerHTML: request ids come from clients'
traffic and must not become markup.
"""

ADMIN_PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>pagedserve admin</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font: 13px/1.4 system-ui, sans-serif; margin: 16px; color: #222; background: #fafafa; }
  h1 { font-size: 18px; margin: 0 0 8px; }
  h2 { font-size: 14px; margin: 18px 0 6px; }
  #bar { display: flex; gap: 8px; align-items: center; flex-wrap: wrap; }
  #status { padding: 2px 8px; border-radius: 3px; background: #ddd; }
  #status.ok { background: #cfc; } #status.err { background: #fcc; }
  .stats { display: flex; gap: 18px; flex-wrap: wrap; margin-top: 8px; }
  .stats div b { display: block; font-size: 16px; }
  canvas { border: 1px solid #ccc; background: #fff; display: block; margin-top: 6px; }
  table { border-collapse: collapse; background: #fff; }
  th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: right; font-variant-numeric: tabular-nums; }
  th { background: #eee; } td:first-child { text-align: left; font-family: monospace; }
  .swatch { display: inline-block; width: 10px; height: 10px; margin-right: 6px; vertical-align: middle; }
  #tip { position: fixed; pointer-events: none; background: #333; color: #fff; padding: 2px 6px; border-radius: 3px; display: none; }
  .legend span { margin-right: 14px; }
</style>
</head>
<body>
<h1>pagedserve &mdash; scheduler</h1>
<div id="bar">
  <label>Admin key <input id="key" type="password" size="28" autocomplete="off"></label>
  <button id="save">Save</button>
  <span id="status">connecting&hellip;</span>
</div>
<h2>Replicas</h2><table id="replicas"></table>
<label>Showing replica <select id="replica-select"></select></label>
<div class="stats" id="stats"></div>
<h2>KV block pool</h2>
<div class="legend"><span><i class="swatch" style="background:#ddd"></i>free</span>
<span><i class="swatch" style="background:#8ab;outline:2px solid #000"></i>shared (outlined)</span>
<span>other colours: owning request</span></div>
<canvas id="pool" width="900" height="40"></canvas>
<h2>Running</h2><table id="running"></table>
<h2>Waiting</h2><table id="waiting"></table>
<h2>Swapped</h2><table id="swapped"></table>
<h2>Executors</h2><table id="executors"></table>
<h2>Executor events</h2><table id="executor-events"></table>
<div id="tip"></div>
<script>
"use strict";
const keyInput = document.getElementById("key");
keyInput.value = localStorage.getItem("pagedserve-admin-key") || "";
document.getElementById("save").onclick = () => { localStorage.setItem("pagedserve-admin-key", keyInput.value); poll(); };

function colourOf(owner) {
  let h = 0;
  for (let i = 0; i < owner.length; i++) h = (h * 31 + owner.charCodeAt(i)) >>> 0;
  return "hsl(" + (h % 360) + ", 65%, 55%)";
}
// "" is free; a "*" marks a block shared by several sequences (the rest, if any, names one owner).
function parseOwner(raw) {
  const shared = raw.includes("*");
  const owner = raw.replace(/\\*/g, "");
  return { free: raw === "", shared: shared, owner: owner };
}

let lastPool = null, cell = 10, cols = 1;
function drawPool(pool) {
  const canvas = document.getElementById("pool");
  const ctx = canvas.getContext("2d");
  lastPool = pool;
  if (!pool) { canvas.height = 20; ctx.clearRect(0, 0, canvas.width, canvas.height); ctx.fillText("no executor has reported its KV cache yet", 6, 14); return; }
  const n = pool.block_owners.length;
  canvas.width = Math.max(300, Math.min(document.body.clientWidth - 20, 1400));
  cell = n > 8000 ? 4 : n > 2000 ? 7 : 12;
  cols = Math.max(1, Math.floor(canvas.width / cell));
  canvas.height = Math.ceil(n / cols) * cell + 1;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  for (let i = 0; i < n; i++) {
    const o = parseOwner(pool.block_owners[i]);
    const x = (i % cols) * cell, y = Math.floor(i / cols) * cell;
    ctx.fillStyle = o.free ? "#ddd" : (o.owner ? colourOf(o.owner) : "#8ab");
    ctx.fillRect(x, y, cell - 1, cell - 1);
    if (o.shared) { ctx.strokeStyle = "#000"; ctx.lineWidth = 1; ctx.strokeRect(x + 0.5, y + 0.5, cell - 2, cell - 2); }
  }
}
document.getElementById("pool").addEventListener("mousemove", (e) => {
  const tip = document.getElementById("tip");
  if (!lastPool) { tip.style.display = "none"; return; }
  const r = e.target.getBoundingClientRect();
  const i = Math.floor((e.clientY - r.top) / cell) * cols + Math.floor((e.clientX - r.left) / cell);
  if (i < 0 || i >= lastPool.block_owners.length) { tip.style.display = "none"; return; }
  tip.textContent = "block " + i + ": " + (lastPool.block_owners[i] || "free");
  tip.style.left = (e.clientX + 12) + "px"; tip.style.top = (e.clientY + 12) + "px"; tip.style.display = "block";
});
document.getElementById("pool").addEventListener("mouseleave", () => { document.getElementById("tip").style.display = "none"; });

function fillTable(id, columns, rows) {
  const table = document.getElementById(id);
  table.replaceChildren();
  const head = table.insertRow();
  for (const [title] of columns) { const th = document.createElement("th"); th.textContent = title; head.appendChild(th); }
  if (rows.length === 0) { const td = table.insertRow().insertCell(); td.colSpan = columns.length; td.textContent = "none"; return; }
  for (const row of rows) {
    const tr = table.insertRow();
    columns.forEach(([, get], c) => {
      const td = tr.insertCell();
      if (c === 0 && row.request_id) {
        const sw = document.createElement("i"); sw.className = "swatch"; sw.style.background = colourOf(row.request_id); td.appendChild(sw);
      }
      td.appendChild(document.createTextNode(String(get(row))));
    });
  }
}
const requestColumns = [
  ["request", r => r.request_id], ["status", r => r.status], ["prompt", r => r.num_prompt_tokens],
  ["output", r => r.num_output_tokens + " / " + r.max_tokens], ["computed", r => r.num_computed_tokens],
  ["blocks", r => r.block_ids.length], ["preemptions", r => r.num_preemptions],
  ["age s", r => (Date.now() / 1000 - r.arrival_time).toFixed(1)],
];
const executorColumns = [  // one row per rank of a tensor-parallel group
  ["group", e => e.group_id], ["rank", e => `${e.rank} of ${e.world_size}`],
  ["executor", e => e.executor_id], ["device", e => e.device], ["model", e => e.model], ["blocks", e => e.num_blocks],
  ["heartbeat age s", e => e.last_heartbeat_age_s.toFixed(1)], ["alive", e => e.alive ? "yes" : "NO"],
];
const executorEventColumns = [
  ["at", e => new Date(e.at * 1000).toLocaleTimeString()], ["executor", e => e.executor_id], ["event", e => e.event],
  ["detail", e => e.detail], ["requeued", e => e.num_requeued],
];

const replicaColumns = [
  ["replica", r => r.replica_id], ["address", r => r.address], ["routable", r => r.routable ? "yes" : "NO"],
  ["load", r => r.load], ["in flight here", r => r.in_flight_here],
  ["running", r => r.snapshot ? r.snapshot.running.length : "-"], ["waiting", r => r.snapshot ? r.snapshot.waiting.length : "-"],
  ["blocks used / total", r => r.snapshot && r.snapshot.block_pool ? r.snapshot.block_pool.num_used_blocks + " / " + r.snapshot.block_pool.num_blocks : "-"],
  ["cached blocks", r => r.snapshot && r.snapshot.block_pool ? r.snapshot.block_pool.num_cached_blocks : "-"],
];
const replicaSelect = document.getElementById("replica-select");

function chooseReplica(s) {
  // Every replica is listed; the details below are the chosen one's (the first answering by default).
  const replicas = s.replicas || [];
  const ids = replicas.map(r => r.replica_id);
  if (Array.from(replicaSelect.options).map(o => o.value).join() !== ids.join()) {
    const chosen = replicaSelect.value;
    replicaSelect.replaceChildren();
    for (const id of ids) { const o = document.createElement("option"); o.value = id; o.textContent = id; replicaSelect.appendChild(o); }
    if (ids.includes(chosen)) replicaSelect.value = chosen;
  }
  const picked = replicas.find(r => r.replica_id === replicaSelect.value);
  return picked && picked.snapshot ? picked.snapshot : s;
}

function showStats(s) {
  const p = s.block_pool;
  const items = [
    ["model", s.model], ["max model len", s.max_model_len], ["uptime s", s.uptime_s.toFixed(0)],
    ["running", s.running.length], ["waiting", s.waiting.length], ["swapped", s.swapped.length],
    ["steps/s", s.steps.steps_per_s.toFixed(1)], ["mean batch", s.steps.mean_batch_size.toFixed(1)],
    ["preemptions", s.steps.num_preemptions], ["executors lost", s.num_executors_lost],
  ];
  if (p) items.push(
    ["blocks used / total", p.num_used_blocks + " / " + p.num_blocks], ["free", p.num_free_blocks],
    ["cached", p.num_cached_blocks], ["shared", p.num_shared_blocks], ["block size", p.block_size],
    ["utilisation", (100 * p.utilisation).toFixed(1) + " %"],
  );
  const box = document.getElementById("stats");
  box.replaceChildren();
  for (const [label, value] of items) {
    const d = document.createElement("div"), b = document.createElement("b");
    b.textContent = String(value); d.appendChild(b); d.appendChild(document.createTextNode(label)); box.appendChild(d);
  }
}

function setStatus(text, ok) {
  const el = document.getElementById("status");
  el.textContent = text; el.className = ok ? "ok" : "err";
}

let inFlight = false;
async function poll() {
  if (inFlight) return;
  inFlight = true;
  try {
    const headers = keyInput.value ? { "Authorization": "Bearer " + keyInput.value } : {};
    const res = await fetch("/admin/scheduler", { headers: headers, cache: "no-store" });
    if (!res.ok) {
      let message = res.status + "";
      try { message += ": " + (await res.json()).error.message; } catch (e) {}
      setStatus(message, false);
      return;
    }
    const all = await res.json();
    fillTable("replicas", replicaColumns, all.replicas || []);
    const s = chooseReplica(all);
    showStats(s);
    drawPool(s.block_pool);
    fillTable("running", requestColumns, s.running);
    fillTable("waiting", requestColumns, s.waiting);
    fillTable("swapped", requestColumns, s.swapped);
    fillTable("executors", executorColumns, s.executors);
    fillTable("executor-events", executorEventColumns, s.executor_events.slice().reverse());
    setStatus("live " + new Date().toLocaleTimeString(), true);
  } catch (e) {
    setStatus("gateway unreachable: " + e, false);
  } finally {
    inFlight = false;
  }
}
poll();
setInterval(poll, 1000);
</script>
</body>
</html>
"""
