// snapq web console: a client of the server's JSON API (/v1/...), signed in with a session
// cookie. Hand-written, no library, no build step. Every value from the server is put into the
// page with textContent (the `h` helper below); nothing here ever assigns markup.
'use strict';

// ---- state and helpers --------------------------------------------------------------------

// gen: the newest route; showing: the route whose page is drawn; routing: the page running now.
const S = { me: null, csrf: null, timers: [], gen: 0, showing: 0, routing: Promise.resolve() };

/** An element: h('td', {className: 'x', onclick: f}, 'text', child, ...). Strings become text. */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'className') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k in el && typeof v !== 'string') el[k] = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const $ = (sel, root) => (root || document).querySelector(sel);
const main = () => $('#main');

/** Draws the current page. A page that was left while it waited for the API draws nothing: the
 * page navigated to comes after it and is the one shown. */
function show(...nodes) {
  if (S.showing !== S.gen) return;
  main().replaceChildren(...nodes);
}

function bytes(n) {
  if (n === null || n === undefined) return '';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = Number(n);
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? v : v.toFixed(1)) + ' ' + units[i];
}

function when(ms) {
  if (ms === null || ms === undefined || ms === '') return '';
  const d = new Date(typeof ms === 'number' ? ms : Date.parse(ms));
  return isNaN(d) ? String(ms) : d.toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
}

/** A time as a user types it: as the console shows times (2026-12-02 05:49:49Z), RFC 3339 or
 * epoch milliseconds; '' is no time (null). Throws a message that says what to type. */
function timeInput(what, text) {
  const t = text.trim();
  if (!t) return null;
  const ms = /^\d+$/.test(t) ? Number(t) : Date.parse(t.replace(' ', 'T'));
  if (isNaN(ms)) throw new Error(what + ' "' + t + '" is not a time: give one as 2026-12-02 05:49:49Z (RFC 3339) or epoch milliseconds');
  return ms;
}

/** A time window from two inputs: { since, until } in epoch ms (either may be null). An empty
 * window (until not after since) is an error that says so, before anything is asked. */
function timeWindow(sinceText, untilText) {
  const since = timeInput('Since', sinceText);
  const until = timeInput('Until', untilText);
  if (since !== null && until !== null && until <= since) {
    throw new Error('Empty time window: Until (' + when(until) + ') must be later than Since (' + when(since) + ')');
  }
  return { since, until };
}

function operator() { return S.me && (S.me.role === 'operator' || S.me.role === 'admin'); }
function admin() { return S.me && S.me.role === 'admin'; }

/** Repeats `fn` every `ms` while the current page is shown. */
function every(ms, fn) {
  S.timers.push(setInterval(fn, ms));
}

function message(text, kind) {
  const m = $('#message');
  if (m) { m.textContent = text; m.className = kind || ''; }
}

class ApiError extends Error {
  constructor(status, text) { super(text); this.status = status; }
}

/** Calls the API with the session cookie (and the CSRF token on changes): the response and its JSON. */
async function request(method, path, body) {
  const headers = { Accept: 'application/json' };
  if (method !== 'GET' && S.csrf) headers['X-CSRF-Token'] = S.csrf;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const r = await fetch(path, {
    method, headers, credentials: 'same-origin',
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await r.json(); } catch (_) { data = null; }
  if (r.status === 401 && path !== '/v1/session') {
    S.me = null;
    location.hash = '#/signin';
    throw new ApiError(401, (data && data.error) || 'signed out');
  }
  if (!r.ok) throw new ApiError(r.status, (data && data.error) || r.statusText);
  return { r, data };
}

/** Calls the API: the answer's JSON. */
async function api(method, path, body) {
  return (await request(method, path, body)).data;
}

/** A GET of a paged listing: its rows and the URL of the next page (`Link: <URL>; rel="next"`). */
async function apiPage(path) {
  const { r, data } = await request('GET', path);
  const link = /<([^>]*)>\s*;\s*rel="next"/.exec(r.headers.get('Link') || '');
  return { data, next: link ? link[1] : null };
}

function notFound(err) {
  show(h('div', { id: 'notfound' },
    h('h2', {}, 'Not found'),
    h('p', {}, err.message),
    h('p', {}, h('a', { href: '#/live' }, 'Back to Live Endpoints'))));
}

/** Runs a page; a 404 from the API shows the not-found page, other errors a message. */
async function page(fn) {
  try {
    await fn();
  } catch (err) {
    if (err.status === 404) notFound(err);
    else if (err.status !== 401) show(h('p', { className: 'error', id: 'page-error' }, err.message));
  }
}

function confirmBox(title, ...body) {
  return new Promise((resolve) => {
    $('#modal-title').textContent = title;
    $('#modal-body').replaceChildren(...body);
    const modal = $('#modal');
    modal.hidden = false;
    const done = (answer) => {
      modal.hidden = true;
      $('#confirm-yes').onclick = null;
      $('#confirm-no').onclick = null;
      resolve(answer);
    };
    $('#confirm-yes').onclick = () => done(true);
    $('#confirm-no').onclick = () => done(false);
  });
}

function table(id, columns, rows) {
  return h('table', { id },
    h('thead', {}, h('tr', {}, columns.map((c) => h('th', {}, c)))),
    h('tbody', {}, rows));
}

// ---- sign-in -----------------------------------------------------------------------------------

function signinPage() {
  $('#top').hidden = true;
  const error = h('p', { id: 'signin-error', className: 'error' });
  const form = h('form', { id: 'signin', className: 'card signin' },
    h('h2', {}, 'Sign in to snapq'),
    h('label', { for: 'username' }, 'Username'),
    h('input', { id: 'username', name: 'username', autocomplete: 'username', required: true }),
    h('label', { for: 'password' }, 'Password'),
    h('input', { id: 'password', name: 'password', type: 'password', autocomplete: 'current-password', required: true }),
    h('p', {}, h('button', { id: 'signin-submit', type: 'submit', className: 'primary' }, 'Sign in')),
    error);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    error.textContent = 'Signing in…';
    try {
      const r = await api('POST', '/v1/session', {
        username: $('#username').value, password: $('#password').value,
      });
      S.csrf = r.csrf_token;
      await loadMe();
      location.hash = '#/live';
    } catch (err) {
      error.textContent = err.message;
    }
  });
  show(form);
  $('#username').focus();
}

async function loadMe() {
  const me = await api('GET', '/v1/session');
  S.me = me;
  S.csrf = me.csrf_token;
  $('#whoami').textContent = me.user + ' (' + me.role + ')';
  $('#nav-admin').hidden = me.role !== 'admin';
  $('#top').hidden = false;
}

async function signOut() {
  try { await api('DELETE', '/v1/session'); } catch (_) { /* signed out either way */ }
  S.me = null;
  S.csrf = null;
  location.hash = '#/signin';
}

// ---- Live Endpoints --------------------------------------------------------------------------

async function livePage() {
  const matches = h('ul', { id: 'matches' });
  const search = h('input', { id: 'search', placeholder: 'Computer name or IP address', autocomplete: 'off' });
  let selected = null;
  let seq = 0;
  const choose = (e) => {
    selected = e.hostname;
    search.value = e.hostname;
    matches.replaceChildren();
  };
  search.addEventListener('input', async () => {
    selected = null;
    const text = search.value.trim();
    const mine = ++seq;
    if (!text) { matches.replaceChildren(); return; }
    const found = await api('GET', '/v1/endpoints?limit=20&search=' + encodeURIComponent(text));
    if (mine !== seq) return; // a later keystroke has its own answer
    matches.replaceChildren(...found.map((e) => h('li', {
      className: 'match', dataset: { host: e.hostname }, onclick: () => choose(e),
    }, h('span', { className: 'dot' + (e.online ? ' online' : ''), title: e.online ? 'online' : 'offline' }),
    e.hostname, ' ', h('span', { className: 'muted' }, e.ips.join(', ')))));
    if (!found.length) matches.append(h('li', { className: 'none muted' }, 'No accessible endpoint matches'));
  });
  const connectButton = operator() ? h('button', {
    id: 'connect', className: 'primary', onclick: async () => {
      const target = selected || search.value.trim();
      if (!target) return message('Type and pick an endpoint first', 'error');
      try {
        await api('POST', '/v1/connections', { targets: [target] });
        message('Connected to ' + target, 'ok');
        await refresh();
      } catch (err) { message(err.message, 'error'); }
    },
  }, 'Connect') : null;

  const body = h('tbody');
  const selectedIds = () => [...body.querySelectorAll('input.select:checked')].map((c) => c.value);
  const bulk = (verb, fn) => async () => {
    const ids = selectedIds();
    if (!ids.length) return message('Select connections first', 'error');
    try {
      for (const id of ids) await fn(id);
      message(verb + ' ' + ids.length + ' connection(s)', 'ok');
    } catch (err) { message(err.message, 'error'); }
    for (const c of body.querySelectorAll('input.select:checked')) c.checked = false;
    await refresh();
  };
  async function refresh() {
    const list = await api('GET', '/v1/connections');
    const checked = new Set(selectedIds());
    body.replaceChildren(...list.map((c) => h('tr', { className: 'connection', dataset: { id: c.id, endpoint: c.endpoint } },
      h('td', {}, h('input', { type: 'checkbox', className: 'select', value: String(c.id), checked: checked.has(String(c.id)) })),
      h('td', {}, h('a', { className: 'endpoint-link', href: '#/grid/' + c.id }, c.endpoint)),
      h('td', { className: 'status' }, c.status, c.reason ? h('div', { className: 'muted' }, c.reason) : null),
      h('td', {}, c.target.kind === 'snapshot' ? 'snapshot ' + c.target.id : 'live'),
      h('td', {}, c.address || ''),
      h('td', {}, when(c.since_ms)),
      h('td', {}, when(c.last_activity_ms)),
      h('td', {}, bytes(c.db_bytes)),
      h('td', {}, c.oldest_ts ? when(c.oldest_ts) + ' – ' + when(c.newest_ts) : ''))));
  }
  show(
    h('h2', {}, 'Live Endpoints'),
    h('div', { className: 'bar' }, h('div', { className: 'typeahead' }, search, matches), connectButton),
    h('p', { id: 'message' }),
    h('h3', {}, 'Connections'),
    h('div', { className: 'bar' },
      h('button', { id: 'reconnect-selected', onclick: bulk('Reconnected', (id) => api('POST', '/v1/connections/' + id + '/reconnect')) }, 'Connect again'),
      operator() ? h('button', { id: 'delete-selected', className: 'danger', onclick: bulk('Closed', (id) => api('DELETE', '/v1/connections/' + id)) }, 'Delete') : null),
    h('table', { id: 'connections' },
      h('thead', {}, h('tr', {}, ['', 'Endpoint', 'Status', 'Target', 'Address', 'Since', 'Last activity', 'Database', 'Time range'].map((c) => h('th', {}, c)))),
      body));
  search.focus();
  await refresh();
  every(5000, () => refresh().catch(() => {}));
}

// ---- events grid -------------------------------------------------------------------------------

const OPS = ['co', 'eq', 'ne', 'gt', 'gte', 'lt', 'lte', 'nc', 'sw', 'ew', 'isempty', 'range'];

async function gridPage(id) {
  const conn = await api('GET', '/v1/connections/' + encodeURIComponent(id));
  const live = conn.target.kind !== 'snapshot';
  const g = { type: 'process', sort: '-ts', cursors: [null], page: 0, filters: [], any: false, rows: [], since: null, until: null };
  const head = h('h2', {}, conn.endpoint, ' ', h('span', { className: 'muted' },
    live ? '(live connection ' + conn.id + ')' : '(snapshot ' + conn.target.id + ')'));
  if (conn.status !== 'active') {
    show(head, h('p', { id: 'message', className: 'error' }, 'This connection is ' + conn.status + (conn.reason ? ': ' + conn.reason : '') + '. '),
      h('button', { id: 'reconnect', onclick: async () => { await api('POST', '/v1/connections/' + conn.id + '/reconnect'); gridPage(id); } }, 'Connect again'));
    return;
  }
  const summary = await api('GET', '/v1/connections/' + conn.id + '/summary');
  const types = Object.keys(summary.counts).filter((t) => t !== 'meta');
  const tabs = h('div', { className: 'tabs', id: 'tabs' });
  const thead = h('thead');
  const tbody = h('tbody');
  const filterRows = h('div', { id: 'filters' });
  const treeView = h('div', { id: 'tree-view', className: 'tree' });
  const exportStatus = h('div', { id: 'export-status' });
  const pageInfo = h('span', { id: 'page-info', className: 'muted' });

  function drawTabs() {
    tabs.replaceChildren(...types.map((t) => h('button', {
      className: 'tab' + (t === g.type ? ' current' : ''), dataset: { type: t },
      onclick: () => { g.type = t; g.sort = '-ts'; g.filters = []; drawFilters(); reset(); drawTabs(); },
    }, t + ' (' + summary.counts[t] + ')')));
  }
  function fieldsOf() {
    const keys = g.rows.length ? Object.keys(g.rows[0]) : ['id', 'ts'];
    return keys;
  }
  function drawFilters() {
    filterRows.replaceChildren(...g.filters.map((f, i) => h('div', { className: 'filter-row' },
      h('select', { className: 'f-field', onchange: (e) => { f.field = e.target.value; } },
        [...new Set([f.field, ...fieldsOf()])].map((k) => h('option', { value: k, selected: k === f.field }, k))),
      h('select', { className: 'f-op', onchange: (e) => { f.op = e.target.value; } },
        OPS.map((o) => h('option', { value: o, selected: o === f.op }, o))),
      h('input', { className: 'f-value', value: f.value, oninput: (e) => { f.value = e.target.value; } }),
      h('button', { className: 'f-remove', onclick: () => { g.filters.splice(i, 1); drawFilters(); } }, '✕'))));
  }
  function params() {
    const q = new URLSearchParams();
    q.set('type', g.type);
    q.set('sort', g.sort);
    q.set('limit', '50');
    for (const f of g.filters) q.append('where', (f.field + ' ' + f.op + ' ' + (f.op === 'isempty' ? '' : f.value)).trim());
    if (g.any) q.set('any', 'true');
    if (g.since !== null) q.set('since', String(g.since));
    if (g.until !== null) q.set('until', String(g.until));
    return q;
  }
  async function load() {
    const q = params();
    const cursor = g.cursors[g.page];
    if (cursor) q.set('cursor', cursor);
    let data;
    try {
      data = await api('GET', '/v1/connections/' + conn.id + '/events?' + q);
    } catch (err) { refused(err.message); return; }
    message('');
    g.rows = data.events;
    g.cursors[g.page + 1] = data.next_cursor;
    $('#next').disabled = !data.next_cursor;
    $('#prev').disabled = g.page === 0;
    pageInfo.textContent = 'page ' + (g.page + 1) + ', ' + g.rows.length + ' rows';
    const cols = g.rows.length ? orderColumns(Object.keys(g.rows[0])) : [];
    thead.replaceChildren(h('tr', {}, h('th', {}, ''), cols.map((c) => h('th', {
      className: 'sortable', dataset: { field: c },
      onclick: () => { g.sort = g.sort === c ? '-' + c : c; reset(); },
    }, c, g.sort === c ? ' ▲' : g.sort === '-' + c ? ' ▼' : ''))));
    tbody.replaceChildren(...g.rows.map((ev) => {
      const box = h('input', { type: 'checkbox', className: 'select-event', value: g.type + ':' + ev.id });
      const tr = h('tr', { className: 'event', dataset: { ref: g.type + ':' + ev.id } }, h('td', {}, box),
        cols.map((c) => h('td', { className: typeof ev[c] === 'number' ? 'cell num' : 'cell', dataset: { col: c } },
          (c === 'ts' || c === 'end_ts') && typeof ev[c] === 'number' ? when(ev[c]) : ev[c] === null ? '' : String(ev[c]))));
      box.addEventListener('change', () => tr.classList.toggle('selected', box.checked));
      return tr;
    }));
    if (g.filters.length === 0) drawFilters();
  }
  function reset() { g.page = 0; g.cursors = [null]; load(); }
  /** An error in place of the rows: no rows of an earlier query stay on show under it. */
  function refused(text) {
    message(text, 'error');
    g.rows = [];
    tbody.replaceChildren();
    pageInfo.textContent = '';
    $('#next').disabled = true;
  }
  /** Apply: the filters as they are, and the time window typed in Since and Until. */
  function apply() {
    try {
      Object.assign(g, timeWindow($('#since').value, $('#until').value));
    } catch (err) { refused(err.message); return; }
    reset();
  }
  const selectedRefs = () => [...tbody.querySelectorAll('input.select-event:checked')].map((c) => c.value);

  async function tree() {
    const refs = selectedRefs().filter((r) => r.startsWith('process:'));
    if (refs.length !== 1) return message('Select one process row for its tree', 'error');
    try {
      const t = await api('GET', '/v1/connections/' + conn.id + '/tree?process=' + refs[0].split(':')[1]);
      const label = (p) => (p.path || '') + ' [pid ' + p.pid + '] ' + (p.cmdline || '');
      let inner = h('li', { className: 'this' }, label(t.process),
        h('ul', {}, t.children.map((c) => h('li', { className: 'child' }, label(c)))));
      for (const a of [...t.ancestors].reverse()) inner = h('li', { className: 'ancestor' }, label(a), h('ul', {}, inner));
      treeView.replaceChildren(h('h3', {}, 'Process tree'), h('ul', {}, inner),
        t.ancestors_truncated ? h('p', { className: 'muted' }, 'ancestors cut short') : null);
    } catch (err) { message(err.message, 'error'); }
  }
  async function saveEvidence() {
    const refs = selectedRefs();
    if (!refs.length) return message('Select rows to save', 'error');
    try {
      const saved = await api('POST', '/v1/evidence', { connection: String(conn.id), events: refs, note: $('#evidence-note').value });
      message('Saved ' + saved.length + ' event(s) as evidence', 'ok');
    } catch (err) { message(err.message, 'error'); }
  }
  async function exportRows() {
    const p = params();
    try {
      const made = await api('POST', '/v1/exports', {
        connection: String(conn.id), format: $('#export-format').value, types: [g.type],
        where: p.getAll('where'), any: g.any, sort: g.sort,
        since: p.get('since') || undefined, until: p.get('until') || undefined,
      });
      watchExport(made.id, exportStatus);
    } catch (err) { message(err.message, 'error'); }
  }
  async function capture() {
    try {
      const info = await api('GET', '/v1/endpoints/' + encodeURIComponent(conn.endpoint));
      const size = info.live && info.live.db_bytes;
      const ok = await confirmBox('Capture a snapshot of ' + conn.endpoint + '?',
        h('p', { id: 'capture-size' }, 'Database size: ' + (size ? bytes(size) : 'unknown (the endpoint did not answer)')),
        h('p', { id: 'capture-free' }, 'Free disk on the server: ' + bytes(info.server_free_bytes) +
          ' (reserve ' + bytes(info.capture_reserve_bytes) + ', held by running captures ' + bytes(info.reserved_by_captures) + ')'));
      if (!ok) return;
      const q = await api('POST', '/v1/connections/' + conn.id + '/capture');
      const m = $('#message');
      m.className = 'ok';
      m.replaceChildren('Capture queued (snapshot ' + q.snapshot_id + '). ',
        h('a', { id: 'capture-progress', href: '#/snapshots/' + encodeURIComponent(q.hostname) }, 'See its progress in Saved Evidence › Snapshots'));
    } catch (err) { message(err.message, 'error'); }
  }

  show(head,
    h('p', { className: 'muted' }, summary.total + ' events, ' + when(summary.oldest_ts) + ' – ' + when(summary.newest_ts)),
    tabs,
    h('div', { className: 'card wide' },
      filterRows,
      h('div', { className: 'bar' },
        h('button', { id: 'add-filter', onclick: () => { g.filters.push({ field: fieldsOf().includes('cmdline') ? 'cmdline' : 'id', op: 'co', value: '' }); drawFilters(); } }, '+ Condition'),
        h('label', {}, 'Match ', h('select', { id: 'match', onchange: (e) => { g.any = e.target.value === 'any'; } },
          h('option', { value: 'all' }, 'all'), h('option', { value: 'any' }, 'any')), ' conditions'),
        h('label', {}, 'Since ', h('input', { id: 'since', className: 'time', placeholder: '2026-12-02 05:00:00Z', title: 'Events at or after this time (UTC as shown in the grid, RFC 3339 or epoch ms)' })),
        h('label', {}, 'Until ', h('input', { id: 'until', className: 'time', placeholder: '2026-12-02 06:00:00Z', title: 'Events before this time (UTC as shown in the grid, RFC 3339 or epoch ms)' })),
        h('button', { id: 'apply', className: 'primary', onclick: apply }, 'Apply'))),
    h('div', { className: 'bar' },
      h('button', { id: 'prev', onclick: () => { g.page--; load(); } }, '‹ Previous'),
      h('button', { id: 'next', onclick: () => { g.page++; load(); } }, 'Next ›'), pageInfo,
      h('button', { id: 'tree', onclick: tree }, 'Process tree'),
      operator() ? [h('input', { id: 'evidence-note', placeholder: 'note' }),
        h('button', { id: 'save-evidence', onclick: saveEvidence }, 'Save evidence'),
        h('select', { id: 'export-format' }, ['csv', 'jsonl', 'xlsx'].map((f) => h('option', { value: f }, f))),
        h('button', { id: 'export', onclick: exportRows }, 'Export')] : null,
      operator() && live ? h('button', { id: 'capture', className: 'primary', onclick: capture }, 'Capture') : null),
    h('p', { id: 'message' }),
    exportStatus,
    treeView,
    h('table', { id: 'events' }, thead, tbody));
  drawTabs();
  await load();
}

/** Columns in the order a reader wants them: id and time first, the process, then the rest. */
const FIRST_COLUMNS = ['id', 'ts', 'user', 'pid', 'ppid', 'path', 'cmdline', 'op', 'query', 'answer', 'remote_addr', 'remote_port', 'key'];
function orderColumns(keys) {
  const first = FIRST_COLUMNS.filter((k) => keys.includes(k));
  return first.concat(keys.filter((k) => !first.includes(k)));
}

/** Follows an export job: its progress, then a download link. */
function watchExport(id, box) {
  const status = h('a', { id: 'export-state', href: '#/export/' + id }, 'export ' + id + ': queued');
  const bar = h('progress', { id: 'export-progress' });
  box.replaceChildren(status, ' ', bar);
  const timer = setInterval(async () => {
    try {
      const e = await api('GET', '/v1/exports/' + id);
      status.textContent = 'export ' + id + ': ' + e.state + ', ' + e.rows + ' rows' + (e.error ? ' — ' + e.error : '');
      if (e.state === 'complete') {
        clearInterval(timer);
        bar.max = 1; bar.value = 1;
        box.append(' ', h('a', { id: 'export-download', href: '/v1/exports/' + id + '/file', download: e.file_name || '' }, 'Download ' + (e.file_name || 'export') + ' (' + bytes(e.bytes) + ')'));
      } else if (e.state === 'failed' || e.state === 'cancelled') {
        clearInterval(timer);
        bar.remove();
      }
    } catch (err) {
      // Gone (deleted elsewhere): stop; anything else may pass (a restart, a slow moment).
      if (err.status === 404) { clearInterval(timer); status.textContent = 'export ' + id + ': ' + err.message; }
    }
  }, 500);
  S.timers.push(timer);
}

// ---- Saved Evidence > Snapshots -----------------------------------------------------------------

/**
 * Endpoints with their number of captures, a page at a time (GET /v1/snapshots/summary); an
 * endpoint's snapshots are read when it is expanded (GET /v1/snapshots?endpoint=...), newest
 * first, a page at a time. `#/snapshots/HOST` shows that endpoint alone, expanded.
 */
async function snapshotsPage(openHost) {
  const ENDPOINTS_PAGE = 100;
  const SNAPSHOTS_PAGE = 50;
  const list = h('div', { id: 'snapshot-groups' });
  const moreEndpoints = h('button', {
    id: 'more-endpoints', hidden: true,
    onclick: () => loadEndpoints(moreEndpoints.dataset.next).catch((err) => message(err.message, 'error')),
  }, 'More endpoints');
  const uploadStatus = h('div', { id: 'upload-status' });
  const file = h('input', { id: 'upload-file', type: 'file', accept: '.db' });
  const bar = h('progress', { id: 'upload-progress', max: 1, value: 0, hidden: true });
  // hostname -> { summary, el, open, rows (loaded snapshots, newest first), next (URL of older ones) }
  const groups = new Map();

  async function del(body, what) {
    if (!await confirmBox('Delete ' + what + '?', h('p', {}, 'This permanently removes ' + what + ' from the server.'))) return;
    try {
      await api('POST', '/v1/snapshots/delete', body);
      message('Deleting ' + what, 'ok');
    } catch (err) { message(err.message, 'error'); }
    await refresh();
  }
  /** Keep (a retention hold: no schedule prunes it) or let go of a snapshot. */
  async function keep(s, on) {
    const what = s.name || 'snapshot ' + s.id;
    try {
      await api('POST', '/v1/snapshots/' + s.id + (on ? '/keep' : '/unkeep'));
      message(on ? 'Keeping ' + what + ': schedules never prune it' : what + ' is no longer kept: a schedule\'s keep rule may prune it', 'ok');
    } catch (err) { message(err.message, 'error'); }
    // The endpoint's summary does not change with a mark: read its snapshots again.
    const g = groups.get(s.hostname);
    if (g && g.open) await loadSnapshots(g, null).catch((err) => message(err.message, 'error'));
  }
  async function connect(id) {
    try {
      const c = await api('POST', '/v1/snapshots/' + id + '/connect');
      location.hash = '#/grid/' + c.id;
    } catch (err) { message(err.message, 'error'); }
  }
  function snapshotRow(s) {
    return h('tr', { className: 'snapshot', dataset: { id: s.id, state: s.state } },
      h('td', {}, s.name || '(' + s.state + ')', s.kept ? h('span', {
        className: 'kept', title: 'kept by ' + s.kept_by + ' since ' + when(s.kept_ms) + ': schedules never prune it',
      }, 'kept') : null),
      h('td', { className: 'state' }, s.state, s.error ? h('div', { className: 'error' }, s.error) : null),
      h('td', {}, s.state === 'complete' || s.state === 'failed' ? '' : h('progress', {
        className: 'snap-progress', max: s.bytes_total || 1, value: s.bytes_total ? s.bytes_done : 0,
      }), s.bytes_total ? ' ' + bytes(s.bytes_done) + ' / ' + bytes(s.bytes_total) : ''),
      h('td', {}, bytes(s.size)),
      h('td', {}, s.origin),
      h('td', {}, s.requested_by),
      h('td', {}, when(s.created_ms)),
      h('td', {}, s.state === 'complete' ? h('button', { className: 'open', onclick: () => connect(s.id) }, 'Connect') : null,
        operator() ? h('button', { className: s.kept ? 'unkeep' : 'keep', onclick: () => keep(s, !s.kept) }, s.kept ? 'Unkeep' : 'Keep') : null,
        operator() ? h('button', { className: 'delete danger', onclick: () => del({ ids: [s.id] }, 'snapshot ' + (s.name || s.id)) }, 'Delete') : null));
  }
  function states(sum) {
    return Object.entries(sum.states).filter(([st]) => st !== 'complete').map(([st, n]) => n + ' ' + st).join(', ');
  }
  function draw(g) {
    const sum = g.summary;
    const el = h('div', { className: 'snap-group', dataset: { host: sum.hostname } },
      h('div', { className: 'bar' },
        h('button', { className: 'expand', onclick: () => toggle(g) }, (g.open ? '▾ ' : '▸ ') + sum.hostname),
        h('span', { className: 'captures muted' }, sum.captures + ' capture(s)'),
        h('span', { className: 'states muted' }, states(sum)),
        h('span', { className: 'latest muted' }, 'latest ' + when(sum.latest_ms)),
        operator() ? h('button', { className: 'delete-all danger', onclick: () => del({ endpoint: sum.hostname }, 'all snapshots of ' + sum.hostname) }, 'Delete all') : null),
      g.open ? table(null, ['Name', 'State', 'Progress', 'Size', 'Origin', 'Requested by', 'Created', ''], g.rows.map(snapshotRow)) : null,
      g.open && g.next ? h('button', {
        className: 'older', onclick: () => loadSnapshots(g, g.next).catch((err) => message(err.message, 'error')),
      }, 'Older snapshots') : null);
    if (g.el) g.el.replaceWith(el);
    g.el = el;
    return el;
  }
  /** Reads one endpoint's snapshots: its first page again (`url` null), or the older page at `url`. */
  async function loadSnapshots(g, url) {
    const first = '/v1/snapshots?endpoint=' + encodeURIComponent(g.summary.hostname) + '&limit=' + Math.max(SNAPSHOTS_PAGE, url ? 0 : g.rows.length);
    const page = await apiPage(url || first);
    const rows = page.data.length ? page.data[0].snapshots : [];
    g.rows = url ? g.rows.concat(rows) : rows;
    g.next = page.next;
    draw(g);
  }
  async function toggle(g) {
    g.open = !g.open;
    if (g.open) await loadSnapshots(g, null).catch((err) => message(err.message, 'error'));
    else draw(g);
  }
  const summaryUrl = (limit) => openHost
    ? '/v1/snapshots/summary?endpoint=' + encodeURIComponent(openHost)
    : '/v1/snapshots/summary?limit=' + limit;
  const busy = (g) => g.rows.some((s) => s.state !== 'complete' && s.state !== 'failed');
  function showMore(next) {
    moreEndpoints.hidden = !next;
    moreEndpoints.dataset.next = next || '';
  }
  /** Appends the next page of endpoints (the "More endpoints" button). */
  async function loadEndpoints(url) {
    const page = await apiPage(url);
    for (const sum of page.data) {
      if (groups.has(sum.hostname)) continue;
      const g = { summary: sum, el: null, open: false, rows: [], next: null };
      groups.set(sum.hostname, g);
      list.append(draw(g));
    }
    showMore(page.next);
  }
  /**
   * Reads the endpoints again, as many as are listed (at least a page), and the snapshots of
   * the expanded ones whose endpoint changed or which are still in progress; redraws what changed.
   */
  async function refresh() {
    const lastShown = [...groups.keys()].sort().pop();
    const fresh = [];
    let next = null;
    let url = summaryUrl(Math.min(1000, Math.max(ENDPOINTS_PAGE, groups.size)));
    while (url) {
      const page = await apiPage(url);
      fresh.push(...page.data);
      next = page.next;
      const last = fresh.length ? fresh[fresh.length - 1].hostname : null;
      url = next && lastShown !== undefined && last !== null && last < lastShown ? next : null;
    }
    const keep = new Set(fresh.map((sum) => sum.hostname));
    for (const host of [...groups.keys()]) if (!keep.has(host)) groups.delete(host);
    const reload = [];
    for (const sum of fresh) {
      const g = groups.get(sum.hostname);
      if (!g) {
        const added = { summary: sum, el: null, open: sum.hostname === openHost, rows: [], next: null };
        groups.set(sum.hostname, added);
        draw(added);
        if (added.open) reload.push(added);
        continue;
      }
      const changed = JSON.stringify(sum) !== JSON.stringify(g.summary);
      g.summary = sum;
      if (g.open && (changed || busy(g))) reload.push(g);
      else if (changed) draw(g);
    }
    await Promise.all(reload.map((g) => loadSnapshots(g, null)));
    list.replaceChildren(...fresh.map((sum) => groups.get(sum.hostname).el));
    if (!fresh.length) list.append(h('p', { className: 'muted', id: 'no-snapshots' }, 'No snapshots yet.'));
    showMore(next);
  }
  function upload(andConnect) {
    const f = file.files[0];
    if (!f) return message('Choose a snapshot file first', 'error');
    const xhr = new XMLHttpRequest();
    xhr.open('POST', '/v1/uploads?name=' + encodeURIComponent(f.name));
    xhr.setRequestHeader('X-CSRF-Token', S.csrf || '');
    bar.hidden = false;
    bar.max = f.size || 1;
    bar.value = 0;
    uploadStatus.textContent = 'Uploading ' + f.name + '…';
    xhr.upload.onprogress = (e) => { bar.value = e.loaded; };
    xhr.onload = async () => {
      let r = null;
      try { r = JSON.parse(xhr.responseText); } catch (_) { r = null; }
      if (xhr.status !== 202) { uploadStatus.textContent = 'Upload refused: ' + ((r && r.error) || xhr.statusText); uploadStatus.className = 'error'; return; }
      uploadStatus.textContent = 'Uploaded; checking ' + r.name + '…';
      const timer = setInterval(async () => {
        let i;
        try { i = await api('GET', '/v1/ingests/' + r.job_id); } catch (_) { clearInterval(timer); return; }
        if (i.state === 'pending') return;
        clearInterval(timer);
        if (i.state === 'complete' && i.snapshot_id) {
          uploadStatus.textContent = r.name + ' is stored as snapshot ' + i.snapshot_id;
          uploadStatus.className = 'ok';
          if (andConnect) await connect(i.snapshot_id);
          else await refresh();
        } else {
          uploadStatus.className = 'error';
          uploadStatus.textContent = r.name + ' was not stored (' + i.state + '): ' + (i.reason || 'no reason given');
        }
      }, 500);
      S.timers.push(timer);
    };
    xhr.onerror = () => { uploadStatus.textContent = 'Upload failed: the connection broke'; };
    xhr.send(f);
  }
  show(h('h2', {}, 'Saved Evidence › Snapshots'),
    operator() ? h('div', { className: 'card', id: 'upload' }, h('h3', {}, 'Upload Snapshot'),
      h('div', { className: 'bar' }, file,
        h('button', { id: 'upload-only', onclick: () => upload(false) }, 'Upload'),
        h('button', { id: 'upload-connect', className: 'primary', onclick: () => upload(true) }, 'Upload & Connect')),
      bar, uploadStatus) : null,
    h('p', { id: 'message' }),
    openHost ? h('p', {}, h('a', { id: 'all-endpoints', href: '#/snapshots' }, 'All endpoints')) : null,
    list, moreEndpoints);
  await refresh();
  every(1000, () => { if ($('#modal').hidden) refresh().catch(() => {}); });
}

/** One snapshot by id (a link anyone may share; outside the user's groups it does not exist). */
async function snapshotPage(id) {
  const s = await api('GET', '/v1/snapshots/' + encodeURIComponent(id));
  show(h('h2', {}, 'Snapshot ' + s.id + ' of ' + s.hostname),
    table('snapshot', ['Name', 'State', 'Origin', 'Size', 'Events', 'Time range', 'sha256', 'Requested by'], [h('tr', {},
      h('td', {}, s.name || ''), h('td', { className: 'state' }, s.state), h('td', {}, s.origin), h('td', {}, bytes(s.size)),
      h('td', {}, s.events === null ? '' : String(s.events)), h('td', {}, s.oldest_ts ? when(s.oldest_ts) + ' – ' + when(s.newest_ts) : ''),
      h('td', { className: 'cell' }, s.sha256 || ''), h('td', {}, s.requested_by))]),
    h('p', {}, h('a', { href: '#/snapshots/' + encodeURIComponent(s.hostname) }, 'All snapshots of ' + s.hostname)));
}

/** One export by id: its progress and download link. */
async function exportPage(id) {
  await api('GET', '/v1/exports/' + encodeURIComponent(id));
  const box = h('div', { id: 'export-status' });
  show(h('h2', {}, 'Export ' + id), box);
  watchExport(id, box);
}

// ---- Saved Evidence > Events -----------------------------------------------------------------

async function evidencePage() {
  const all = await api('GET', '/v1/evidence');
  const filter = h('input', { id: 'evidence-filter', placeholder: 'Filter by endpoint, type, note or content' });
  const body = h('tbody');
  const status = h('div', { id: 'export-status' });
  function draw() {
    const text = filter.value.toLowerCase();
    const rows = all.filter((e) => !text || JSON.stringify(e).toLowerCase().includes(text));
    body.replaceChildren(...rows.map((e) => h('tr', { className: 'evidence', dataset: { id: e.id } },
      h('td', {}, String(e.id)), h('td', {}, e.hostname), h('td', {}, e.event_type + ':' + e.event_id),
      h('td', {}, when(e.event_ts)), h('td', { className: 'cell' }, e.event.cmdline || e.event.path || e.event.query || ''),
      h('td', {}, e.note || ''), h('td', {}, e.saved_by), h('td', {}, when(e.saved_ms)))));
  }
  filter.addEventListener('input', draw);
  show(h('h2', {}, 'Saved Evidence › Events'),
    h('div', { className: 'bar' }, filter,
      operator() ? [h('select', { id: 'export-format' }, ['csv', 'jsonl', 'xlsx'].map((f) => h('option', { value: f }, f))),
        h('button', { id: 'export', onclick: async () => {
          try {
            const made = await api('POST', '/v1/exports', { evidence: true, format: $('#export-format').value });
            watchExport(made.id, status);
          } catch (err) { message(err.message, 'error'); }
        } }, 'Export')] : null),
    h('p', { id: 'message' }), status,
    h('table', { id: 'evidence-table' },
      h('thead', {}, h('tr', {}, ['Id', 'Endpoint', 'Event', 'Time', 'Detail', 'Note', 'Saved by', 'Saved'].map((c) => h('th', {}, c)))), body));
  draw();
}

// ---- Queue, Fleet ----------------------------------------------------------------------------------

async function queuePage() {
  const counts = h('tbody');
  const nodes = h('tbody');
  const jobs = h('tbody');
  const stateSel = h('select', { id: 'job-state', onchange: () => refresh() },
    ['', 'pending', 'running', 'retrying', 'done', 'failed', 'cancelled'].map((s) => h('option', { value: s }, s || 'all states')));
  const act = (verb, id) => async () => {
    if (verb === 'cancel' && !await confirmBox('Cancel job ' + id + '?',
      h('p', {}, 'It stops now and is not tried again; Retry runs it again later.'))) return;
    try { await api('POST', '/v1/queue/jobs/' + encodeURIComponent(id) + '/' + verb); message(verb + ' ' + id, 'ok'); } catch (err) { message(err.message, 'error'); }
    await refresh();
  };
  async function refresh() {
    const st = await api('GET', '/v1/queue/status');
    counts.replaceChildren(...st.status.kinds.map((k) => h('tr', { className: 'kind', dataset: { kind: k.kind } },
      h('td', {}, k.kind), ['pending', 'running', 'retrying', 'done', 'failed', 'cancelled'].map((f) => h('td', { dataset: { f } }, String(k[f]))))));
    nodes.replaceChildren(...(st.nodes || []).map((n) => h('tr', { className: 'node' + (n.this_node ? ' this' : ''), dataset: { node: n.node } },
      h('td', {}, n.node, n.this_node ? h('span', { className: 'muted' }, ' (answered)') : null),
      h('td', { className: 'heartbeat' + (n.silent ? ' error' : '') }, (n.heartbeat_age_ms / 1000).toFixed(1) + ' s ago' + (n.silent ? ' (silent)' : '')),
      h('td', {}, String(n.running)), h('td', {}, n.kinds.join(', ')))));
    const list = await api('GET', '/v1/queue/jobs?limit=200' + (stateSel.value ? '&state=' + stateSel.value : ''));
    jobs.replaceChildren(...list.map((j) => h('tr', { className: 'job', dataset: { id: j.id, state: j.state, kind: j.kind } },
      h('td', {}, j.id), h('td', {}, j.kind), h('td', { className: 'state' }, j.state),
      h('td', {}, j.attempts + ' / ' + j.max_attempts), h('td', { className: 'cell' }, j.last_error || ''),
      h('td', {}, j.progress ? h('progress', { max: j.progress.total || 1, value: j.progress.done }) : ''),
      h('td', {}, when(j.created_at)),
      h('td', {}, operator() && (j.state === 'failed' || j.state === 'cancelled') ? h('button', { className: 'retry', onclick: act('retry', j.id) }, 'Retry') : null,
        operator() && ['pending', 'running', 'retrying'].includes(j.state) ? h('button', { className: 'cancel danger', onclick: act('cancel', j.id) }, 'Cancel') : null))));
  }
  show(h('h2', {}, 'Queue'),
    h('table', { id: 'queue-counts' }, h('thead', {}, h('tr', {}, ['Kind', 'Pending', 'Running', 'Retrying', 'Done', 'Failed', 'Cancelled'].map((c) => h('th', {}, c)))), counts),
    h('h3', {}, 'Nodes'),
    h('table', { id: 'queue-nodes' }, h('thead', {}, h('tr', {}, ['Node', 'Heartbeat', 'Running', 'Workers'].map((c) => h('th', {}, c)))), nodes),
    h('div', { className: 'bar' }, h('h3', {}, 'Jobs'), stateSel),
    h('p', { id: 'message' }),
    h('table', { id: 'jobs' }, h('thead', {}, h('tr', {}, ['Id', 'Kind', 'State', 'Attempts', 'Last error', 'Progress', 'Created', ''].map((c) => h('th', {}, c)))), jobs));
  await refresh();
  every(2000, () => refresh().catch(() => {}));
}

async function fleetPage() {
  const cell = (v) => h('td', {}, v === null || v === undefined ? '' : String(v));
  const batchRows = h('tbody');
  const scheduleRows = h('tbody');
  const items = h('div', { id: 'batch-items' });
  let shown = null; // the batch whose outcomes are on show
  async function outcomes(id) {
    shown = id;
    const b = await api('GET', '/v1/fleet/batches/' + id);
    items.replaceChildren(h('h3', {}, 'Batch ' + id + ': per-endpoint outcomes'),
      table('batch-outcomes', ['Endpoint', 'State', 'Snapshot', 'Bytes', 'Error'], (b.items || []).map((i) => h('tr', { className: 'item' },
        cell(i.hostname), cell(i.state), h('td', {}, i.snapshot_id ? h('a', { href: '#/snapshot/' + i.snapshot_id }, String(i.snapshot_id)) : ''),
        h('td', {}, bytes(i.bytes)), cell(i.error)))));
  }
  const act = (id, verb, done) => async () => {
    if (verb === 'cancel' && !await confirmBox('Cancel batch ' + id + '?',
      h('p', {}, 'Its captures that have not started never will; the batch ends cancelled.'))) return;
    try {
      await api('POST', '/v1/fleet/batches/' + id + '/' + verb);
      message(done + ' batch ' + id, 'ok');
    } catch (err) { message(err.message, 'error'); }
    await refresh();
  };
  async function refresh() {
    const [batches, schedules] = await Promise.all([api('GET', '/v1/fleet/batches'), api('GET', '/v1/schedules')]);
    batchRows.replaceChildren(...batches.map((x) => {
      const t = x.totals;
      const finished = t.done + t.failed + t.skipped;
      const live = x.state === 'running' || x.state === 'paused';
      return h('tr', { className: 'batch', dataset: { id: x.id, state: x.state } },
        h('td', {}, h('a', { href: '#/fleet', className: 'batch-link', onclick: (e) => { e.preventDefault(); outcomes(x.id); } }, String(x.id))),
        cell(x.group_name), cell(x.schedule_name), h('td', { className: 'state' }, x.state),
        h('td', {}, h('progress', { max: t.total || 1, value: finished })),
        cell(t.total), cell(t.queued), cell(t.running), cell(t.done), cell(t.failed), cell(t.skipped), h('td', {}, bytes(t.bytes)), cell(x.reason),
        h('td', {}, operator() && x.state === 'running' ? h('button', { className: 'pause', onclick: act(x.id, 'pause', 'Paused') }, 'Pause') : null,
          operator() && x.state === 'paused' ? h('button', { className: 'resume', onclick: act(x.id, 'resume', 'Resumed') }, 'Resume') : null,
          operator() && live ? h('button', { className: 'cancel danger', onclick: act(x.id, 'cancel', 'Cancelling') }, 'Cancel') : null));
    }));
    scheduleRows.replaceChildren(...schedules.map((x) => h('tr', { className: 'schedule', dataset: { name: x.name } }, cell(x.name), cell(x.group_name), cell(x.cron), cell(x.tz),
      cell(x.paused ? '(paused)' : x.next_run_utc), cell(x.last_batch ? x.last_batch.id + ' ' + x.last_batch.state : ''),
      cell([x.keep_last ? 'last ' + x.keep_last : '', x.keep_days ? x.keep_days + ' days' : ''].filter(Boolean).join(', ')),
      cell(x.paused ? 'yes' : 'no'))));
    if (shown !== null) await outcomes(shown);
  }
  const head = (cols) => h('thead', {}, h('tr', {}, cols.map((c) => h('th', {}, c))));
  show(h('h2', {}, 'Fleet'), h('p', { id: 'message' }),
    h('h3', {}, 'Batches'),
    h('table', { id: 'batches' }, head(['Id', 'Group', 'Schedule', 'State', 'Progress', 'Total', 'Queued', 'Running', 'Done', 'Failed', 'Skipped', 'Bytes', 'Reason', '']), batchRows),
    items,
    h('h3', {}, 'Schedules'),
    h('table', { id: 'schedules' }, head(['Name', 'Group', 'Cron', 'Time zone', 'Next run', 'Last batch', 'Keep', 'Paused']), scheduleRows));
  await refresh();
  every(2000, () => { if ($('#modal').hidden) refresh().catch(() => {}); });
}

// ---- Admin ------------------------------------------------------------------------------------------

const ROLES = ['viewer', 'operator', 'admin'];
const ROLE_NOTE = {
  viewer: 'A viewer finds endpoints and reads snapshots, evidence and the queue of their groups.',
  operator: 'An operator also connects, captures, uploads, exports, deletes and runs fleet batches in their groups.',
  admin: 'An admin sees every endpoint and also manages users, tokens, groups and enrollment, and reads the audit log.',
};
/** The audit filters as last applied: they outlive the page being drawn again after a change. */
const AUDIT = { user: '', action: '', since: '', until: '' };
const AUDIT_LIMIT = 200;

async function adminPage() {
  const [users, tokens, groups] = await Promise.all([api('GET', '/v1/users'), api('GET', '/v1/tokens'), api('GET', '/v1/groups')]);
  const enc = encodeURIComponent;
  const cell = (v) => h('td', {}, v === null || v === undefined ? '' : Array.isArray(v) ? v.join(', ') : String(v));
  /** Makes a change; on success draws the page again (the lists as they are now) and says so. */
  async function change(fn, done) {
    try { await fn(); } catch (err) { message(err.message, 'error'); return false; }
    await page(adminPage);
    message(done, 'ok');
    return true;
  }

  function userRow(u) {
    const self = u.name === S.me.user;
    const role = h('select', { className: 'role', title: 'Change the role', onchange: async () => {
      const to = role.value;
      if (!await confirmBox('Change the role of ' + u.name + ' to ' + to + '?',
        h('p', {}, u.name + ' is ' + u.role + ' now. ' + ROLE_NOTE[to]))) { role.value = u.role; return; }
      if (!await change(() => api('POST', '/v1/users/' + enc(u.name) + '/role', { role: to }), u.name + ' is now ' + to)) role.value = u.role;
    } }, ROLES.map((r) => h('option', { value: r, selected: r === u.role }, r)));
    const granted = u.groups.map((g) => h('span', { className: 'granted', dataset: { group: g } }, g,
      h('button', { className: 'revoke-group', title: 'Revoke ' + g, onclick: async () => {
        if (!await confirmBox('Revoke group ' + g + ' from ' + u.name + '?',
          h('p', {}, u.name + ' no longer sees the endpoints of ' + g + ' (unless another group has them).'))) return;
        await change(() => api('DELETE', '/v1/users/' + enc(u.name) + '/groups/' + enc(g)), 'Revoked ' + g + ' from ' + u.name);
      } }, '✕')));
    const grantable = groups.map((g) => g.name).filter((n) => !u.groups.includes(n));
    const pick = grantable.length ? h('select', { className: 'grant-pick' }, grantable.map((n) => h('option', { value: n }, n))) : null;
    const grant = pick ? h('button', { className: 'grant', onclick: () => change(
      () => api('POST', '/v1/users/' + enc(u.name) + '/groups', { group: pick.value }), 'Granted ' + pick.value + ' to ' + u.name) }, 'Grant') : null;
    const setPassword = h('button', { className: 'set-password', onclick: async () => {
      const pw = h('input', { id: 'new-password', type: 'password', autocomplete: 'new-password' });
      const again = h('input', { id: 'new-password-again', type: 'password', autocomplete: 'new-password' });
      if (!await confirmBox('Set the console password of ' + u.name + '?',
        h('p', {}, h('label', {}, 'New password ', pw)), h('p', {}, h('label', {}, 'Once more ', again)),
        h('p', { className: 'muted' }, '8 to 1024 characters; ' + u.name + ' signs in with it from now on.'))) return;
      if (pw.value !== again.value) return message('The two passwords differ; the password of ' + u.name + ' was not changed', 'error');
      await change(() => api('POST', '/v1/users/' + enc(u.name) + '/password', { password: pw.value }), 'Password of ' + u.name + ' set');
    } }, 'Set password');
    const remove = self ? null : h('button', { className: 'remove-user danger', onclick: async () => {
      if (!await confirmBox('Remove user ' + u.name + '?',
        h('p', {}, 'Their ' + u.tokens + ' token(s) stop working and they can no longer sign in. The audit log keeps what they did.'))) return;
      await change(() => api('DELETE', '/v1/users/' + enc(u.name)), 'Removed user ' + u.name);
    } }, 'Remove');
    return h('tr', { className: 'user', dataset: { name: u.name } },
      h('td', { className: 'name' }, u.name, self ? h('span', { className: 'muted' }, ' (you)') : null),
      h('td', {}, role),
      h('td', { className: 'groups' }, granted, pick, grant),
      h('td', { className: 'password' }, u.has_password ? 'set ' : 'none ', setPassword),
      cell(u.tokens), h('td', {}, remove));
  }

  const newUser = h('input', { id: 'new-user', placeholder: 'username' });
  const newRole = h('select', { id: 'new-role' }, ROLES.map((r) => h('option', { value: r }, r)));
  const tokenUser = h('select', { id: 'token-user' }, users.map((u) => h('option', { value: u.name, selected: u.name === S.me.user }, u.name)));
  const tokenLabel = h('input', { id: 'token-label', placeholder: 'label' });
  const tokenExpiry = h('select', { id: 'token-expires' }, [['', 'never expires'], [30, '30 days'], [90, '90 days'], [365, '1 year']]
    .map(([days, text]) => h('option', { value: String(days) }, text)));
  async function createToken() {
    let t;
    try {
      t = await api('POST', '/v1/tokens', {
        user: tokenUser.value, label: tokenLabel.value || null,
        expires_in_secs: tokenExpiry.value ? Number(tokenExpiry.value) * 86400 : undefined,
      });
    } catch (err) { return message(err.message, 'error'); }
    await page(adminPage);
    $('#token-once').replaceChildren(h('p', {}, 'Token ' + t.info.prefix + '… for ' + t.info.user + ' made; copy it now, it is shown this once:'),
      h('div', { className: 'token-once', id: 'new-token' }, t.token));
  }

  const auditRows = h('tbody');
  const auditStatus = h('p', { id: 'audit-status', className: 'muted' });
  const auditInput = (key, placeholder, title) => h('input', { id: 'audit-' + key, value: AUDIT[key], placeholder, title });
  const auditUser = auditInput('user', 'user', 'Only what this user did');
  const auditAction = auditInput('action', 'action (user, token.create)', 'An action, or a family of them: user matches user.add, user.role, …');
  const auditSince = auditInput('since', 'since 2026-12-02 05:00:00Z', 'Entries at or after this time (UTC as shown, RFC 3339 or epoch ms)');
  const auditUntil = auditInput('until', 'until 2026-12-02 06:00:00Z', 'Entries before this time (UTC as shown, RFC 3339 or epoch ms)');
  async function loadAudit() {
    const refused = (text) => { auditRows.replaceChildren(); auditStatus.textContent = text; auditStatus.className = 'error'; };
    let w;
    try { w = timeWindow(auditSince.value, auditUntil.value); } catch (err) { return refused(err.message); }
    Object.assign(AUDIT, { user: auditUser.value.trim(), action: auditAction.value.trim(), since: auditSince.value, until: auditUntil.value });
    const q = new URLSearchParams({ limit: String(AUDIT_LIMIT) });
    if (AUDIT.user) q.set('user', AUDIT.user);
    if (AUDIT.action) q.set('action', AUDIT.action);
    if (w.since !== null) q.set('since_ms', String(w.since));
    if (w.until !== null) q.set('until_ms', String(w.until));
    let entries;
    try { entries = await api('GET', '/v1/audit?' + q); } catch (err) { return refused(err.message); }
    auditRows.replaceChildren(...entries.map((a) => h('tr', { className: 'audit', dataset: { action: a.action } },
      h('td', {}, when(a.ts_ms)), cell(a.actor), cell(a.action), h('td', { className: 'cell' }, a.target), cell(a.result), h('td', { className: 'cell' }, a.detail || ''))));
    auditStatus.className = 'muted';
    auditStatus.textContent = entries.length === AUDIT_LIMIT ? 'the newest ' + AUDIT_LIMIT + ' entries; narrow the filters for older ones' : entries.length + ' entries';
  }

  show(h('h2', {}, 'Admin'), h('p', { id: 'message' }),
    h('h3', {}, 'Users'),
    h('div', { className: 'bar' }, newUser, newRole, h('button', { id: 'add-user', onclick: () => change(
      () => api('POST', '/v1/users', { name: newUser.value, role: newRole.value }), 'Added user ' + newUser.value + ' (' + newRole.value + '); give them a password to sign in') }, 'Add user')),
    table('users', ['Name', 'Role', 'Groups', 'Password', 'Tokens', ''], users.map(userRow)),
    h('h3', {}, 'Tokens'),
    h('div', { className: 'bar' }, h('label', {}, 'for ', tokenUser), tokenLabel, tokenExpiry,
      h('button', { id: 'create-token', onclick: createToken }, 'Create token')),
    h('div', { id: 'token-once' }),
    table('tokens', ['Id', 'User', 'Label', 'Prefix', 'Created', 'Expires', 'Revoked', ''], tokens.map((t) => h('tr', { className: 'token', dataset: { id: t.id, user: t.user } },
      cell(t.id), cell(t.user), cell(t.label), cell(t.prefix), h('td', {}, when(t.created_ms)), h('td', {}, when(t.expires_ms)), h('td', {}, when(t.revoked_ms)),
      h('td', {}, t.revoked_ms || t.bootstrap ? null : h('button', { className: 'revoke danger', onclick: async () => {
        if (!await confirmBox('Revoke token ' + t.prefix + '… of ' + t.user + '?', h('p', {}, 'Whatever uses it stops working at once.'))) return;
        await change(() => api('DELETE', '/v1/tokens/' + t.id), 'Revoked token ' + t.prefix + '…');
      } }, 'Revoke'))))),
    h('h3', {}, 'Computer groups'),
    h('div', { className: 'bar' }, h('input', { id: 'group-name', placeholder: 'group name' }),
      h('input', { id: 'group-hosts', placeholder: 'hostname globs, comma-separated (web-*)' }),
      h('button', { id: 'add-group', onclick: () => {
        const name = $('#group-name').value;
        const hostnames = $('#group-hosts').value.split(',').map((x) => x.trim()).filter(Boolean);
        change(() => api('POST', '/v1/groups', { name, hostnames }), 'Added group ' + name);
      } }, 'Add group')),
    table('groups', ['Name', 'Hostnames', 'CIDRs', 'Labels', 'Members', 'Endpoints now', 'Users', ''], groups.map((g) => h('tr', { className: 'group', dataset: { name: g.name } },
      cell(g.name), cell(g.hostnames), cell(g.cidrs), cell(g.labels), cell(g.members), cell(g.member_count), cell(g.users),
      h('td', {}, h('button', { className: 'remove-group danger', onclick: async () => {
        if (!await confirmBox('Remove group ' + g.name + '?', h('p', {}, 'Users granted it lose the endpoints it gave them.'))) return;
        await change(() => api('DELETE', '/v1/groups/' + enc(g.name)), 'Removed group ' + g.name);
      } }, 'Remove'))))),
    h('h3', {}, 'Audit log'),
    h('form', { id: 'audit-filters', className: 'bar', onsubmit: (e) => { e.preventDefault(); loadAudit(); } },
      auditUser, auditAction, auditSince, auditUntil, h('button', { id: 'audit-apply', type: 'submit', className: 'primary' }, 'Apply')),
    auditStatus,
    h('table', { id: 'audit' }, h('thead', {}, h('tr', {}, ['When', 'Who', 'What', 'Target', 'Result', 'Detail'].map((c) => h('th', {}, c)))), auditRows));
  await loadAudit();
}

// ---- routing ------------------------------------------------------------------------------------

/** Shows the page the location names. Pages run one at a time, in order: one still waiting for
 * the API when the user moves on finishes first, drawing nothing (see `show`). */
async function route() {
  const gen = ++S.gen;
  const previous = S.routing;
  let finished;
  S.routing = new Promise((resolve) => { finished = resolve; });
  await previous;
  try {
    if (gen !== S.gen) return; // a later navigation is queued: it runs instead
    S.showing = gen;
    await showRoute();
  } finally { finished(); }
}

async function showRoute() {
  for (const t of S.timers) clearInterval(t);
  S.timers = [];
  const parts = location.hash.replace(/^#\/?/, '').split('/').map(decodeURIComponent);
  if (parts[0] === 'signin') return signinPage();
  if (!S.me) {
    try { await loadMe(); } catch (_) { return signinPage(); }
  }
  for (const a of document.querySelectorAll('header nav a')) {
    a.classList.toggle('current', a.getAttribute('href') === '#/' + (parts[0] === 'grid' ? 'live' : parts[0]));
  }
  switch (parts[0]) {
    case 'grid': return page(() => gridPage(parts[1]));
    case 'snapshots': return page(() => snapshotsPage(parts[1]));
    case 'snapshot': return page(() => snapshotPage(parts[1]));
    case 'export': return page(() => exportPage(parts[1]));
    case 'evidence': return page(evidencePage);
    case 'queue': return page(queuePage);
    case 'fleet': return page(fleetPage);
    case 'admin': return page(adminPage);
    case 'live': case '': return page(livePage);
    default: return notFound(new Error('no console page ' + parts[0]));
  }
}

window.addEventListener('hashchange', route);
window.addEventListener('DOMContentLoaded', () => {
  $('#signout').addEventListener('click', signOut);
  route();
});
