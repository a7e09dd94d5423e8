"""The orchestrator's live page: one self-contained HTML document (inline CSS and JavaScript, nothing
fetched from elsewhere), served at ``/`` by ``ui.py``.

It polls ``/ui/state`` once a second and draws, per stream, its live thumbnail (fetched every 300 ms
from ``/ui/streams/{id}/thumbnail.jpg``), its figures and three small SVG charts of the last minute
(fps, frame latency p50, frames dropped per second); the containers with their health, capacity and
sessions; and the latest events. Its buttons start a stream with the synthetic input
(``POST /live-video-to-video``) and stop one (``POST /live-video-to-video/{id}/stop``). Every text
from the orchestrator goes in with ``textContent``.
"""

from __future__ import annotations

__all__ = ["PAGE"]

_STYLE = """
:root { color-scheme: dark; --bg: #0f1115; --panel: #171a21; --line: #2a2f3a; --text: #d8dde6;
  --dim: #8b93a3; --accent: #5fb3ff; --good: #5fd38d; --warn: #f0b44c; --bad: #ff6b6b; }
* { box-sizing: border-box; }
body { margin: 0; font: 13px/1.4 system-ui, sans-serif; background: var(--bg); color: var(--text); }
header { display: flex; align-items: center; gap: 16px; padding: 10px 18px;
  border-bottom: 1px solid var(--line); }
header h1 { font-size: 16px; margin: 0; font-weight: 600; }
header .dim { margin-left: auto; }
main { display: grid; grid-template-columns: minmax(0, 1fr) 400px; align-items: start; gap: 16px;
  padding: 16px 18px; }
section { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 12px; }
section + section { margin-top: 16px; }
h2 { font-size: 13px; text-transform: uppercase; letter-spacing: .06em; color: var(--dim); margin: 0 0 10px; }
.dim { color: var(--dim); }
table { width: 100%; border-collapse: collapse; }
td, th { text-align: left; padding: 3px 6px; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { color: var(--dim); font-weight: normal; }
button, select { font: inherit; color: var(--text); background: #232834; border: 1px solid var(--line);
  border-radius: 5px; padding: 4px 10px; cursor: pointer; }
button:hover { border-color: var(--accent); }
button:disabled { opacity: .5; cursor: default; }
.controls { display: flex; gap: 8px; align-items: center; margin-bottom: 12px; }
#message { color: var(--warn); }
.stream { display: flex; gap: 14px; padding: 10px 0; border-top: 1px solid var(--line); }
.stream:first-child { border-top: none; }
.thumb { width: 160px; height: 160px; object-fit: contain; background: #000; border-radius: 4px;
  flex: none; }
.info { flex: 1; min-width: 0; }
.title { display: flex; gap: 10px; align-items: center; }
.title b { font-family: ui-monospace, monospace; overflow: hidden; text-overflow: ellipsis; }
.title button { margin-left: auto; }
.figures { color: var(--dim); margin: 4px 0 6px; }
.charts { display: flex; gap: 10px; flex-wrap: wrap; }
figure { margin: 0; width: 170px; }
figcaption { color: var(--dim); font-size: 11px; }
svg { display: block; width: 170px; height: 48px; background: #11141a; border-radius: 4px; }
.ok { color: var(--good); } .warn { color: var(--warn); } .bad { color: var(--bad); }
#events { max-height: 520px; overflow-y: auto; }
main > * { min-width: 0; }
#containers td:first-child { white-space: normal; overflow-wrap: anywhere; }
.event { padding: 3px 0; border-bottom: 1px solid var(--line); }
.event .type { color: var(--accent); }
.event code { font-size: 11px; }
.empty { color: var(--dim); padding: 8px 0; }
"""

_SCRIPT = """
'use strict';
const POLL_MS = 1000, THUMB_MS = 300;
const cards = new Map();
let lastState = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === 'class') node.className = value; else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}
function fmt(value, digits, unit) {
  return value === null || value === undefined ? '-' : Number(value).toFixed(digits) + (unit || '');
}
function clock(seconds) { return new Date(seconds * 1000).toLocaleTimeString([], {hour12: false}); }
function say(text) { document.getElementById('message').textContent = text; }

async function post(url, body) {
  const response = await fetch(url, {method: 'POST', body: body === undefined ? '' : JSON.stringify(body),
    headers: {'Content-Type': 'application/json'}});
  let answer = null;
  try { answer = await response.json(); } catch (e) { answer = null; }
  return {ok: response.ok, status: response.status, answer};
}

async function startStream() {
  const button = document.getElementById('start');
  const model = document.getElementById('model').value;
  if (!model) { say('no container or live runner is registered yet'); return; }
  button.disabled = true;
  try {
    const result = await post('/live-video-to-video', {model_id: model, source: 'synthetic'});
    say(result.ok ? 'started ' + result.answer.stream_id
                  : 'could not start: ' + ((result.answer && result.answer.error) || result.status));
  } finally { button.disabled = false; poll(); }
}

async function stopStream(id, button) {
  button.disabled = true;
  button.textContent = 'stopping…';
  const result = await post('/live-video-to-video/' + encodeURIComponent(id) + '/stop');
  say(result.ok ? 'stopped ' + id : 'could not stop ' + id + ': ' + result.status);
  poll();
}

function chart(points, key, options) {
  const width = 170, height = 48, pad = 3;
  const values = points.map(options.value || ((p) => p[key]));
  const known = values.filter((v) => v !== null && v !== undefined);
  const top = Math.max(options.floor, ...known) * 1.1;
  const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
  const last = points.length ? points[points.length - 1].t : 0;
  const x = (t) => width - pad - (last - t) * (width - 2 * pad) / 60;
  const y = (v) => height - pad - v * (height - 2 * pad) / top;
  const line = [];
  points.forEach((p, i) => {
    const v = values[i];
    if (v !== null && v !== undefined) line.push(`${x(p.t).toFixed(1)},${y(v).toFixed(1)}`);
  });
  const polyline = document.createElementNS('http://www.w3.org/2000/svg', 'polyline');
  polyline.setAttribute('points', line.join(' '));
  polyline.setAttribute('fill', 'none');
  polyline.setAttribute('stroke', options.color);
  polyline.setAttribute('stroke-width', '1.5');
  svg.append(polyline);
  const latest = known.length ? known[known.length - 1] : null;
  return el('figure', {'data-chart': key},
    svg, el('figcaption', {}, `${options.label}: ${fmt(latest, options.digits)} (max ${fmt(known.length ?
      Math.max(...known) : null, options.digits)})`));
}

function dropsPerSecond(points) {
  return points.map((p, i) => {
    if (i === 0 || p.dropped === null || points[i - 1].dropped === null) return null;
    return Math.max(0, p.dropped - points[i - 1].dropped) / Math.max(0.1, p.t - points[i - 1].t);
  });
}

async function thumbnails(id, card) {
  const img = card.querySelector('img.thumb');
  let shown = null;
  while (cards.get(id) === card) {
    try {
      const response = await fetch('/ui/streams/' + encodeURIComponent(id) + '/thumbnail.jpg',
                                   {cache: 'no-store'});
      if (response.status === 200) {
        const url = URL.createObjectURL(await response.blob());
        await new Promise((resolve) => { img.onload = img.onerror = resolve; img.src = url; });
        if (shown) URL.revokeObjectURL(shown);
        shown = url;
        card.dataset.thumbnails = String(Number(card.dataset.thumbnails || 0) + 1);
      }
    } catch (e) { /* the orchestrator is away: try again */ }
    await new Promise((resolve) => setTimeout(resolve, THUMB_MS));
  }
  if (shown) URL.revokeObjectURL(shown);
}

function card(stream) {
  const stop = el('button', {class: 'stop'}, 'Stop');
  const node = el('div', {class: 'stream', 'data-stream': stream.stream_id},
    el('img', {class: 'thumb', alt: 'latest processed frame of ' + stream.stream_id}),
    el('div', {class: 'info'},
      el('div', {class: 'title'}, el('b', {}, stream.stream_id), el('span', {class: 'state'}), stop),
      el('div', {class: 'figures'}), el('div', {class: 'charts'})));
  stop.addEventListener('click', () => stopStream(stream.stream_id, stop));
  return node;
}

function renderStreams(streams) {
  const list = document.getElementById('streams');
  const wanted = new Set(streams.map((s) => s.stream_id));
  for (const [id, node] of cards) if (!wanted.has(id)) { node.remove(); cards.delete(id); }
  for (const stream of streams) {
    let node = cards.get(stream.stream_id);
    if (!node) {
      node = card(stream);
      cards.set(stream.stream_id, node);
      list.append(node);
      thumbnails(stream.stream_id, node);
    }
    const state = node.querySelector('.state');
    state.textContent = stream.state + (stream.last_status ? ' · ' + stream.last_status : '');
    state.className = 'state ' + (stream.state === 'running' ? 'ok' : 'warn');
    node.querySelector('.figures').textContent =
      `model ${stream.model_id} · ${stream.container} · up ${fmt(stream.uptime_s, 0, ' s')} · ` +
      `${stream.frames_out} frames out · ${fmt(stream.fps, 1)} fps · end-to-end latency p50 ` +
      `${fmt(stream.latency_ms_p50, 1, ' ms')} · dropped ${stream.dropped_frames ?? '-'}`;
    const points = stream.series || [];
    const drops = dropsPerSecond(points);
    node.querySelector('.charts').replaceChildren(
      chart(points, 'fps', {label: 'fps', floor: 30, digits: 1, color: '#5fd38d'}),
      chart(points, 'latency_ms', {label: 'frame latency p50 ms', floor: 10, digits: 1, color: '#5fb3ff'}),
      chart(points, 'drops', {label: 'dropped / s', floor: 1, digits: 1, color: '#ff6b6b',
                              value: (p) => drops[points.indexOf(p)]}));
  }
  document.getElementById('no-streams').hidden = streams.length > 0;
}

function renderContainers(state) {
  const rows = [];
  for (const c of state.containers) {
    const health = c.health || {};
    const reachable = health.http_status === 200;
    rows.push(el('tr', {'data-container': c.url},
      el('td', {}, el('b', {}, c.name), el('br'), el('span', {class: 'dim'}, c.url)),
      el('td', {class: health.http_status ? (reachable ? 'ok' : 'warn') : (c.health ? 'bad' : 'dim')},
        health.http_status ? `${health.state || health.status}, ${fmt(health.ms, 1, ' ms')}`
                           : (c.health ? 'unreachable' : '…')),
      el('td', {}, `${health.sessions ?? c.load} / ${health.capacity ?? c.capacity}`)));
  }
  for (const r of state.live_runners) {
    const health = r.health || {};
    rows.push(el('tr', {'data-runner': r.runner_id},
      el('td', {}, el('b', {}, r.app), el('br'), el('span', {class: 'dim'}, r.url)),
      el('td', {class: r.status === 'ready' ? 'ok' : 'warn'}, 'live runner, ' + r.status +
        (health.state ? ' · ' + health.state : '')),
      el('td', {}, `${r.sessions} / ${r.capacity}`)));
  }
  document.getElementById('containers').replaceChildren(...rows);
  document.getElementById('no-containers').hidden = rows.length > 0;
  const select = document.getElementById('model');
  const chosen = select.value;
  if ([...select.options].map((o) => o.value).join() !== state.models.join()) {
    select.replaceChildren(...state.models.map((m) => el('option', {value: m}, m)));
    if (state.models.includes(chosen)) select.value = chosen;
  }
  document.getElementById('start').disabled = state.models.length === 0;
}

function renderEvents(events) {
  document.getElementById('events').replaceChildren(...events.map((e) =>
    el('div', {class: 'event'}, el('span', {class: 'dim'}, clock(e.at) + ' '),
       el('span', {class: 'type'}, e.type), ' ', el('code', {}, e.stream_id), el('br'),
       el('span', {class: 'dim'}, e.summary))));
  document.getElementById('no-events').hidden = events.length > 0;
}

let polling = null;
async function poll() {
  if (polling) return polling;
  polling = (async () => {
    try {
      const response = await fetch('/ui/state', {cache: 'no-store'});
      lastState = await response.json();
      renderContainers(lastState);
      renderStreams(lastState.streams);
      renderEvents(lastState.events);
      document.getElementById('updated').textContent = 'updated ' + clock(lastState.now);
      document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
    } catch (e) {
      document.getElementById('updated').textContent = 'orchestrator unreachable';
    } finally { polling = null; }
  })();
  return polling;
}

document.getElementById('start').addEventListener('click', startStream);
poll();
setInterval(poll, POLL_MS);
"""

PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>byoc orchestrator</title>
<link rel="icon" href="data:,">
<style>{_STYLE}</style>
</head>
<body>
<header>
  <h1>byoc orchestrator</h1>
  <span class="dim">a local development orchestrator: live view</span>
  <span class="dim" id="updated"></span>
</header>
<main>
  <section>
    <h2>Streams</h2>
    <div class="controls">
      <select id="model" aria-label="model"></select>
      <button id="start" disabled>Start synthetic stream</button>
      <span id="message"></span>
    </div>
    <div id="streams"></div>
    <div class="empty" id="no-streams">No stream is running.</div>
  </section>
  <div>
    <section>
      <h2>Containers</h2>
      <table>
        <thead><tr><th>model and URL</th><th>health</th><th>sessions</th></tr></thead>
        <tbody id="containers"></tbody>
      </table>
      <div class="empty" id="no-containers">No container is registered.</div>
    </section>
    <section>
      <h2>Events</h2>
      <div id="events"></div>
      <div class="empty" id="no-events">No event yet.</div>
    </section>
  </div>
</main>
<script>{_SCRIPT}</script>
</body>
</html>
"""
