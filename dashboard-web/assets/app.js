// The QKD network dashboard: reads api/view once, then follows api/events (one Update per
// second) and redraws. No libraries: charts are SVG polylines. Paths are relative, so the
// page works under /dashboard/ at a KME and at the root of qkd-dashboard.
'use strict';

const HISTORY = 600;
const token = new URLSearchParams(location.search).get('token');
let view = null;
let history = [];

function api(path) {
  if (!token) return path;
  return path + (path.includes('?') ? '&' : '?') + 'token=' + encodeURIComponent(token);
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

const SVG = 'http://www.w3.org/2000/svg';
function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

// A line chart of `values` (null = gap) with an optional dashed threshold line.
function chart(values, threshold, title) {
  const w = 300, h = 70;
  const s = svg('svg', { class: 'chart', viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: 'none', role: 'img' });
  s.append(Object.assign(document.createElementNS(SVG, 'title'), { textContent: title }));
  const finite = values.filter(v => v !== null && Number.isFinite(v));
  let max = Math.max(1e-9, ...finite, threshold ? threshold * 1.3 : 0);
  const y = v => h - 2 - (v / max) * (h - 4);
  const n = Math.max(values.length - 1, 1);
  let pts = [];
  const flush = () => {
    if (pts.length) s.append(svg('polyline', { class: 'line', points: pts.join(' ') }));
    pts = [];
  };
  values.forEach((v, i) => {
    if (v === null || !Number.isFinite(v)) { flush(); return; }
    pts.push(`${((i / n) * w).toFixed(1)},${y(v).toFixed(1)}`);
  });
  flush();
  if (threshold) s.append(svg('line', { class: 'threshold', x1: 0, x2: w, y1: y(threshold), y2: y(threshold) }));
  return s;
}

function bytes(n) {
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

function rate(bitsPerSecond) {
  if (bitsPerSecond >= 1e9) return `${(bitsPerSecond / 1e9).toFixed(2)} Gbit/s`;
  if (bitsPerSecond >= 1e6) return `${(bitsPerSecond / 1e6).toFixed(2)} Mbit/s`;
  if (bitsPerSecond >= 1e3) return `${(bitsPerSecond / 1e3).toFixed(1)} kbit/s`;
  return `${bitsPerSecond.toFixed(0)} bit/s`;
}

function label(name, value) {
  return el('div', { class: 'label' }, el('span', {}, name), el('b', {}, value));
}

// The sample of (kme, peer) in an update, or undefined.
function linkIn(u, kme, peer) {
  const k = u.kmes.find(k => k.kme_id === kme);
  return k && k.links.find(l => l.peer === peer);
}

// The change of f over the last minute of history, per minute (null if too little history).
function perMinute(f) {
  const last = history[history.length - 1];
  if (!last) return null;
  let first = null;
  for (const u of history) {
    if (last.t_ms - u.t_ms <= 60000 && f(u) !== undefined) { first = u; break; }
  }
  if (!first || first === last || f(last) === undefined) return null;
  const dt = (last.t_ms - first.t_ms) / 60000;
  return dt > 0 ? (f(last) - f(first)) / dt : null;
}

// Every link once, seen from its producing end where that KME is in view.
function links(u) {
  const seen = new Map();
  for (const k of u.kmes) {
    for (const l of k.links) {
      const key = [k.kme_id, l.peer].sort().join('-');
      const have = seen.get(key);
      if (!have || (l.producer && !have.link.producer)) seen.set(key, { key, kme: k.kme_id, link: l });
    }
  }
  return [...seen.values()].sort((a, b) => a.key.localeCompare(b.key));
}

async function switchEavesdropper(kme, peer, on) {
  const msg = document.getElementById('message');
  const path = view.eavesdropper_path.replace('{kme}', encodeURIComponent(kme)).replace('{peer}', encodeURIComponent(peer));
  try {
    const r = await fetch(api(path), {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ fraction: on ? 1.0 : 0.0 }),
    });
    const body = await r.json().catch(() => ({}));
    msg.textContent = r.ok
      ? `Eavesdropper on ${kme}–${peer} switched ${on ? 'on' : 'off'}.`
      : `Switching the eavesdropper failed (${r.status}): ${body.message || r.statusText}`;
  } catch (e) {
    msg.textContent = `Switching the eavesdropper failed: ${e}`;
  }
}

function linkCard(entry) {
  const { key, kme, link: l } = entry;
  const [a, b] = [kme, l.peer];
  const card = el('div', { class: 'card' + (l.alarm ? ' alarm' : ''), 'data-link': key, 'data-alarm': String(l.alarm) });
  card.append(el('h3', {}, el('span', {}, `${a} — ${b}`),
    el('span', { class: 'badge' + (l.alarm ? ' alarm' : '') }, l.alarm ? 'ALARM: link aborted' : 'OK')));
  const series = f => history.map(u => { const s = linkIn(u, kme, l.peer); return s ? f(s) : null; });
  if (l.qber !== null && l.qber !== undefined) {
    card.append(label('QBER (dashed: abort threshold)', `${(l.qber * 100).toFixed(2)} %` + (l.abort_qber ? ` / ${(l.abort_qber * 100).toFixed(1)} %` : '')));
    card.append(chart(series(s => s.qber), l.abort_qber, 'QBER'));
    card.append(label('Secure key rate', rate(l.secure_key_rate_bps || 0)));
    card.append(chart(series(s => s.secure_key_rate_bps), null, 'secure key rate'));
  } else {
    card.append(el('div', { class: 'label muted' }, 'no physical model on this link (fixed-rate source)'));
  }
  const cap = Math.max(l.capacity_bytes, 1);
  for (const [who, v] of [[a, l.own_bytes], [b, l.theirs_bytes]]) {
    card.append(label(`Pool for masters at ${who}`, `${bytes(v)} of ${bytes(l.capacity_bytes)}`));
    const fill = el('div', {});
    fill.style.width = `${Math.min(100, (100 * v) / cap).toFixed(1)}%`;
    card.append(el('div', { class: 'bar', 'data-pool': who }, fill));
  }
  const delivered = perMinute(u => { const s = linkIn(u, kme, l.peer); return s && s.consumed_bytes_total; });
  card.append(label('Key delivered', delivered === null ? '…' : `${bytes(delivered)}/min`));
  if (l.producer) {
    const on = l.eavesdropper > 0;
    const can = !!view.eavesdropper_path;
    const btn = el('button', {
      'data-eavesdropper': key, class: on ? 'on' : '',
      title: can ? 'Put an intercept-resend attacker on every pulse (modelled)' : 'Only an operator certificate may switch the eavesdropper',
      onclick: () => switchEavesdropper(kme, l.peer, !on),
    }, can ? (on ? 'Switch eavesdropper off' : 'Switch eavesdropper on') : `Eavesdropper ${on ? 'on' : 'off'} (operators only)`);
    btn.disabled = !can;
    card.append(btn);
  }
  return card;
}

function kmeCard(k) {
  const card = el('div', { class: 'card', 'data-kme': k.kme_id });
  card.append(el('h3', {}, el('span', {}, k.kme_id)));
  card.append(label('Keys awaiting slaves', String(k.keys_awaiting_slaves)));
  const rows = Object.keys(k.requests_total).map(code => {
    const r = perMinute(u => { const s = u.kmes.find(x => x.kme_id === k.kme_id); return s && (s.requests_total[code] || 0); });
    return el('tr', {}, el('td', {}, code), el('td', {}, r === null ? '…' : r.toFixed(0)), el('td', {}, String(k.requests_total[code])));
  });
  card.append(el('div', { class: 'table-wrap' }, el('table', {},
    el('thead', {}, el('tr', {}, el('th', {}, 'HTTP code'), el('th', {}, 'per min'), el('th', {}, 'since start'))),
    el('tbody', {}, ...rows))));
  return card;
}

// Time waited for QKD key: the client's (as it reports, for stores) and the agent's own.
function keyWait(j) {
  const s = ms => `${(ms / 1000).toFixed(1)} s`;
  return j.client_key_wait_ms === null || j.client_key_wait_ms === undefined
    ? `agent ${s(j.key_wait_ms)}`
    : `client ${s(j.client_key_wait_ms)} · agent ${s(j.key_wait_ms)}`;
}

function agentBlock(a) {
  const block = el('div', { 'data-agent': a.agent });
  block.append(el('div', { class: 'agent-name' }, a.agent));
  if (!a.jobs.length) {
    block.append(el('div', { class: 'muted' }, 'no jobs yet'));
    return block;
  }
  const rows = a.jobs.map(j => {
    const done = j.total_bytes ? ` of ${bytes(j.total_bytes)} (${((100 * j.bytes) / Math.max(j.total_bytes, 1)).toFixed(0)} %)` : '';
    const complete = j.total_bytes && j.bytes >= j.total_bytes;
    const state = j.error ? el('span', { class: 'failed' }, `failed: ${j.error}`)
      : (j.running ? 'running' : (complete ? 'done' : 'incomplete'));
    return el('tr', {}, el('td', {}, j.name || j.backup_id.slice(0, 8)), el('td', {}, String(j.share)),
      el('td', {}, j.kind), el('td', {}, j.client), el('td', {}, bytes(j.bytes) + done),
      el('td', {}, rate(j.rate_bps * 8)), el('td', {}, keyWait(j)), el('td', {}, state));
  });
  block.append(el('div', { class: 'table-wrap' }, el('table', {},
    el('thead', {}, el('tr', {}, ...['backup', 'share', 'kind', 'client', 'bytes', 'rate', 'waiting for key', 'state'].map(h => el('th', {}, h)))),
    el('tbody', {}, ...rows))));
  return block;
}

function render() {
  const u = history[history.length - 1];
  if (!u) return;
  document.getElementById('links').replaceChildren(...links(u).map(linkCard));
  document.getElementById('kmes').replaceChildren(...u.kmes.map(kmeCard));
  const agents = document.getElementById('agents');
  agents.replaceChildren(...u.agents.map(agentBlock));
  if (!u.agents.length) agents.append(el('div', { class: 'muted' }, 'no site agents in this view'));
  const un = document.getElementById('unreachable');
  un.replaceChildren(...u.unreachable.map(x => el('li', { class: 'failed' }, `${x.name}: ${x.error}`)));
  document.getElementById('unreachable-section').hidden = !u.unreachable.length;
}

function setStatus(text, cls) {
  const s = document.getElementById('status');
  s.textContent = text;
  s.className = 'status ' + cls;
}

async function start() {
  try {
    const r = await fetch(api('api/view'));
    if (!r.ok) throw new Error(`${r.status} ${(await r.json().catch(() => ({}))).message || r.statusText}`);
    view = await r.json();
  } catch (e) {
    setStatus('not connected', 'bad');
    document.getElementById('message').textContent = `Cannot read the dashboard: ${e.message || e}`;
    return;
  }
  history = view.history.slice(-HISTORY);
  document.getElementById('title').textContent = view.title === 'network' ? 'QKD network' : `QKD network at ${view.title}`;
  document.title = `QKD dashboard: ${view.title}`;
  document.getElementById('viewer').textContent = `viewing as ${view.viewer.name} (${view.viewer.role})`;
  render();
  const es = new EventSource(api('api/events'));
  es.onopen = () => setStatus('live', 'ok');
  es.onerror = () => setStatus('reconnecting…', 'bad');
  es.onmessage = ev => {
    history.push(JSON.parse(ev.data));
    if (history.length > HISTORY) history.shift();
    setStatus('live', 'ok');
    render();
  };
}

start();
