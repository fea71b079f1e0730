/* Earmark's live dashboard: draw the channels' state, then keep it current from /events/.
 *
 * Protocol (workers/broker.py): on connect the stream sends one "snapshot"
 * per channel ({channel, seq, state}), then "delta" events ({channel, seq,
 * base, set, del}). A delta applies only on top of the seq we hold; a gap
 * means an event was lost, so we reconnect and start again from a snapshot.
 * Keep-alives carry the broker's seqs, which catches a lost last delta too.
 * Rows are updated in place: a cell is touched only when its text changes.
 */
(function () {
  "use strict";

  const root = document.getElementById("earmark-dashboard");
  if (!root) return;
  const eventsUrl = root.dataset.eventsUrl;
  const channels = {};
  let source = null;

  // --- formatting -------------------------------------------------------------

  function text(v) { return v === null || v === undefined ? "" : String(v); }

  function heartbeat(h) {
    if (!h) return "";
    if (!h.late) return "≤ " + h.within + " s";
    return (h.age < 60 ? h.age + " s" : h.age < 3600 ? h.age / 60 + " min" : h.age / 3600 + " h") + " ago (late)";
  }

  function memory(v) {
    if (v === null || v === undefined || v === "") return "";
    if (typeof v === "number") return (v / 1048576).toFixed(0) + " MiB";
    if (typeof v === "object") {
      if ("used" in v && "total" in v) return memory(v.used) + " / " + memory(v.total);
      return JSON.stringify(v);
    }
    return String(v);
  }

  function when(iso) { return iso ? new Date(iso).toLocaleTimeString() : ""; }

  // --- in-place table rows -------------------------------------------------------

  function setCell(row, field, value) {
    const cell = row.querySelector('[data-field="' + field + '"]');
    if (cell && cell.textContent !== value) cell.textContent = value;
    return cell;
  }

  // A path or an error naming one: the same text, with a line-break opportunity after each "/" (a <wbr>,
  // which adds no text), so a long path wraps between its folders instead of splitting a word.
  function setPath(row, field, value) {
    const cell = row.querySelector('[data-field="' + field + '"]');
    if (!cell || cell.textContent === value) return cell;
    cell.textContent = "";
    value.split("/").forEach((part, i) => {
      if (i) { cell.appendChild(document.createTextNode("/")); cell.appendChild(document.createElement("wbr")); }
      if (part) cell.appendChild(document.createTextNode(part));
    });
    return cell;
  }

  function setBar(row, field, value, max) {
    const bar = row.querySelector('[data-bar="' + field + '"]');
    if (!bar) return;
    const v = value === null || value === undefined ? null : Number(value);
    if (v === null) { bar.removeAttribute("value"); bar.hidden = true; return; }
    bar.hidden = false;
    if (bar.max !== max) bar.max = max;
    // An indeterminate bar (no value attribute) also reads as 0: always set it then.
    if (!bar.hasAttribute("value") || bar.value !== v) bar.value = v;
  }

  function rowFor(tbody, key, cells) {
    let row = tbody.querySelector('tr[data-key="' + CSS.escape(key) + '"]');
    if (row) return row;
    row = document.createElement("tr");
    row.dataset.key = key;
    for (const c of cells) {
      const td = document.createElement("td");
      if (c.bar) {
        const bar = document.createElement("progress");
        bar.dataset.bar = c.bar;
        bar.hidden = true;
        td.appendChild(bar);
        td.appendChild(document.createTextNode(" "));
        const label = document.createElement("span");
        label.dataset.field = c.field;
        td.appendChild(label);
      } else {
        td.dataset.field = c.field;
      }
      row.appendChild(td);
    }
    // Keep rows sorted by key so that the table does not jump around.
    const after = Array.from(tbody.children).find(r => r.dataset.key > key);
    tbody.insertBefore(row, after || null);
    return row;
  }

  function dropMissing(tbody, keys) {
    for (const row of Array.from(tbody.children)) {
      if (!keys.has(row.dataset.key)) row.remove();
    }
  }

  // --- the sections ----------------------------------------------------------------

  const QUEUE_CELLS = ["queue", "queued", "running", "done", "failed", "cancelled", "paused", "per_minute", "eta"]
    .map(f => ({field: f}));

  function drawQueues(state) {
    const tbody = document.querySelector("#earmark-queues tbody");
    const keys = new Set();
    const rate = (state.throughput || {}).per_minute || {};
    for (const [key, counts] of Object.entries(state)) {
      if (!key.startsWith("queue:")) continue;
      keys.add(key);
      const name = key.slice(6);
      const row = rowFor(tbody, key, QUEUE_CELLS);
      setCell(row, "queue", name);
      for (const s of ["queued", "running", "done", "failed", "cancelled"]) setCell(row, s, text(counts[s]));
      setCell(row, "paused", counts.paused ? "paused" : "");
      setCell(row, "per_minute", text(rate[name] || 0));
      setCell(row, "eta", text(counts.eta));  // time left at the last minute's rate (workers/live/eta.py)
    }
    dropMissing(tbody, keys);
  }

  const WORKER_CELLS = [
    {field: "host"}, {field: "queue"}, {field: "number"}, {field: "pid"}, {field: "state"}, {field: "file"},
    {field: "progress", bar: "progress"}, {field: "device"}, {field: "gpu_memory"}, {field: "heartbeat"},
    {field: "counts"},
  ];

  function drawWorkers(state) {
    const tbody = document.querySelector("#earmark-workers tbody");
    const keys = new Set(Object.keys(state));
    for (const [key, w] of Object.entries(state)) {
      const row = rowFor(tbody, key, WORKER_CELLS);
      for (const f of ["host", "queue", "number", "pid", "device"]) setCell(row, f, text(w[f]));
      setCell(row, "state", text(w.state)).className = "state-" + text(w.state);
      const working = w.state === "busy" || w.state === "stopping";  // an idle row may still name its last job
      setPath(row, "file", working ? text(w.file || w.job_key) : "");
      setBar(row, "progress", w.state === "busy" ? w.progress : null, 1);
      setCell(row, "progress", w.state === "busy" && w.progress !== null && w.progress !== undefined
        ? Math.round(w.progress * 100) + "%" + (w.detail && w.detail !== w.file ? " " + w.detail : "") : "");
      setCell(row, "gpu_memory", memory(w.gpu_memory));
      setCell(row, "heartbeat", heartbeat(w.heartbeat)).className = w.heartbeat && w.heartbeat.late ? "late" : "";
      setCell(row, "counts", text(w.done || 0) + " / " + text(w.failed || 0));
    }
    dropMissing(tbody, keys);
    document.getElementById("earmark-no-workers").hidden = keys.size > 0;
    document.getElementById("earmark-worker-count").textContent = "(" + keys.size + ")";
  }

  const SCAN_CELLS = [
    {field: "library"}, {field: "state"}, {field: "folders", bar: "folders"}, {field: "eta"}, {field: "files_seen"},
    {field: "new"},
    {field: "changed"}, {field: "failed"}, {field: "missing"}, {field: "error"},
  ];

  function drawScans(state) {
    const tbody = document.querySelector("#earmark-scans tbody");
    const keys = new Set();
    for (const [key, s] of Object.entries(state)) {
      if (!key.startsWith("scan:")) continue;
      keys.add(key);
      const row = rowFor(tbody, key, SCAN_CELLS);
      for (const f of ["library", "state", "files_seen", "new", "changed", "failed", "missing"]) setCell(row, f, text(s[f]));
      row.dataset.state = text(s.state);
      const total = s.folders_total || 0;
      setBar(row, "folders", total ? s.folders_done || 0 : null, Math.max(1, total));
      setCell(row, "folders", total ? (s.folders_done || 0) + " / " + total : "");
      // Time left for the folders found so far, at the folders per minute since the scan began.
      setCell(row, "eta", s.eta ? s.eta + (s.rate ? " (" + s.rate + " folders/min)" : "") : "");
      setPath(row, "error", text(s.error || s.last_scan_error || (s.errors ? s.errors + " unreadable folder(s)" : "")));
    }
    dropMissing(tbody, keys);
  }

  function drawFailures(list) {
    const tbody = document.querySelector("#earmark-failures tbody");
    const cells = ["id", "queue", "what", "attempts", "when", "error"].map(f => ({field: f}));
    const keys = new Set();
    for (const f of list || []) {
      const key = String(1e12 - f.id).padStart(13, "0");  // ascending keys = newest first
      keys.add(key);
      const row = rowFor(tbody, key, cells);
      setCell(row, "id", String(f.id));
      setCell(row, "queue", f.queue);
      setPath(row, "what", text(f.path || f.key));
      setCell(row, "attempts", String(f.attempts));
      setCell(row, "when", when(f.finished_at));
      setPath(row, "error", text(f.error));
    }
    dropMissing(tbody, keys);
    document.getElementById("earmark-no-failures").hidden = keys.size > 0;
  }

  const DRAW = {
    queues: drawQueues,
    workers: drawWorkers,
    jobs: state => { drawScans(state); drawFailures(state.failures); },
  };

  // --- the stream --------------------------------------------------------------------

  function status(text, cls) {
    const el = document.getElementById("earmark-connection");
    el.textContent = text;
    el.className = cls;
  }

  function onSnapshot(event) {
    const snap = JSON.parse(event.data);
    channels[snap.channel] = {seq: snap.seq, state: snap.state};
    DRAW[snap.channel](snap.state);
    status("live", "live");
  }

  function onDelta(event) {
    const delta = JSON.parse(event.data);
    const channel = channels[delta.channel];
    if (!channel || channel.seq === null || delta.seq <= channel.seq) return;  // old news
    if (delta.base !== channel.seq) return resync("missed an update");
    for (const [key, value] of Object.entries(delta.set)) channel.state[key] = value;
    for (const key of delta.del) delete channel.state[key];
    channel.seq = delta.seq;
    DRAW[delta.channel](channel.state);
  }

  function onKeepAlive(event) {
    if (!event.data) return;
    const seqs = JSON.parse(event.data).seq || {};
    for (const [name, seq] of Object.entries(seqs)) {
      const channel = channels[name];
      if (channel && channel.seq !== null && seq > channel.seq) return resync("missed an update");
    }
  }

  function resync(why) {
    status("resynchronising (" + why + ")…", "connecting");
    for (const name of Object.keys(channels)) channels[name].seq = null;
    connect();
  }

  function connect() {
    if (source) source.close();
    source = new EventSource(eventsUrl);
    source.addEventListener("snapshot", onSnapshot);
    source.addEventListener("delta", onDelta);
    source.addEventListener("keep-alive", onKeepAlive);
    source.addEventListener("stream-error", () => status("refused (log in again)", "error"));
    // EventSource reconnects by itself after a network error; the new stream starts with snapshots.
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) status("disconnected (reload the page)", "error");
      else status("reconnecting…", "connecting");
    };
  }

  // supervisord's table is not in the database: read it again every few seconds while the page is in view,
  // but not while the person is using one of its forms.
  const supervisor = document.getElementById("earmark-supervisor");
  if (supervisor && supervisor.dataset.url) {
    setInterval(async () => {
      if (document.hidden || supervisor.contains(document.activeElement)) return;
      try {
        const response = await fetch(supervisor.dataset.url, {credentials: "same-origin"});
        if (response.ok && !response.redirected && !supervisor.contains(document.activeElement)) supervisor.innerHTML = await response.text();
      } catch (e) { /* the next tick tries again */ }
    }, 5000);
  }

  const initial = JSON.parse(document.getElementById("earmark-initial").textContent);
  for (const [name, snap] of Object.entries(initial)) {
    channels[name] = {seq: null, state: snap.state};
    DRAW[name](snap.state);
  }
  // Open the stream once the page has loaded: a stream opened earlier keeps the page "loading".
  if (document.readyState === "complete") connect();
  else window.addEventListener("load", connect);
})();
