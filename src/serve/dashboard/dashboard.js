/* dashboard.js: the live page of a kdpeers run. Polls GET /history?since=SEQ (only what is new
   since the last reply) and draws every series it names with Chart.js: the charts and series
   come from the data (a new chart id or series name appears without a change here), and so do
   the configuration table and the events. With a token on the server, /history answers 401: the
   page asks for the token, keeps it in this tab's sessionStorage and sends it in the
   Authorization header (never in a URL). Everything from the server is shown as text. */
"use strict";

(function () {
  const POLL_MS = 1000, HIDDEN_POLL_MS = 5000, MAX_RETRY_MS = 10000;
  const MAX_POINTS = 4000; /* per series in the page: then every other point but the last goes */
  const TOKEN_KEY = "kdpeers.token";
  const PEER_COLOURS = ["#1f77b4", "#2ca02c", "#9467bd", "#17becf", "#8c564b",
                        "#e377c2", "#bcbd22", "#7f7f7f", "#aec7e8", "#98df8a"];
  /* beside peers (a teacher, an EMA, ...): red first; in charts without peers: blue first */
  const OTHER_COLOURS = ["#d62728", "#ff7f0e", "#6b4c9a", "#e6ab02", "#1b9e77", "#666666"];
  const PLAIN_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"];
  const NAMED_COLOURS = {ensemble: "#222222", compute: "#2ca02c", exchange: "#ff7f0e",
                         allreduce: "#9467bd", wait: "#d62728"};
  const EVENT_COLOURS = {checkpoint: "#2ca02c", control: "#1f77b4", rollback: "#d62728",
                         stop: "#7f7f7f", resize: "#ff7f0e"};

  const $ = (id) => document.getElementById(id);
  const state = {
    token: sessionStorage.getItem(TOKEN_KEY) || "",
    runId: null, seq: 0, charts: new Map(), order: [], events: [],
    status: null, timer: null, failures: 0, polls: 0, lastOk: 0, waitingForToken: false,
  };
  window.kdpeersDashboard = state; /* for the browser test and for curious users */

  /* ---- formatting ---- */
  const pct = (v) => (100 * v).toFixed(v >= 0.9995 || v < 0.001 ? 1 : 2) + "%";
  const pctTick = (v) => Number((100 * v).toFixed(2)) + "%"; /* axis ticks: 78%, 82.5% */
  function num(v) {
    if (v === null || v === undefined || !isFinite(v)) return "–";
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(3);
    return Number(v.toPrecision(5)).toString();
  }
  function duration(s) {
    if (s === null || s === undefined || !(s >= 0)) return "–";
    s = Math.round(s);
    if (s >= 3600) return Math.floor(s / 3600) + "h" + String(Math.floor(s / 60) % 60).padStart(2, "0") + "m";
    if (s >= 60) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
    return s + "s";
  }
  const title = (id) => id.replace(/[_.]+/g, " ").replace(/^./, (c) => c.toUpperCase());

  /* ---- charts ---- */
  function colourOf(chart, name) {
    const m = /^peer(\d+)(\.|$)/.exec(name);
    if (m) return PEER_COLOURS[Number(m[1]) % PEER_COLOURS.length];
    if (NAMED_COLOURS[name]) return NAMED_COLOURS[name];
    const others = chart.datasets.filter((d) => !/^peer\d+/.test(d.label) && !NAMED_COLOURS[d.label]);
    const pal = chart.datasets.some((d) => /^peer\d+/.test(d.label)) ? OTHER_COLOURS : PLAIN_COLOURS;
    return pal[others.length % pal.length];
  }

  /* draws the events as dashed vertical lines at their step (Chart.js plugin API) */
  const eventMarks = {
    id: "kdpeersEvents",
    afterDatasetsDraw(chart) {
      const x = chart.scales.x, area = chart.chartArea, ctx = chart.ctx;
      if (!x || !area) return;
      ctx.save();
      ctx.setLineDash([4, 3]);
      ctx.lineWidth = 1;
      for (const e of state.events) {
        if (e.x === null || e.x < x.min || e.x > x.max) continue;
        const px = x.getPixelForValue(e.x);
        ctx.strokeStyle = EVENT_COLOURS[e.kind] || "#999999";
        ctx.globalAlpha = 0.55;
        ctx.beginPath();
        ctx.moveTo(px, area.top);
        ctx.lineTo(px, area.bottom);
        ctx.stroke();
      }
      ctx.restore();
    },
  };

  /* A chart's look follows its declared unit (the trainer declares the charts, /history names
     them): one small builder per part of the options, and chartOptions puts them together. */
  const grid = () => ({color: "#eef0f3"}); /* (each axis its own object: Chart.js keeps them) */
  const isRatio = (meta) => meta.unit === "ratio" || meta.unit === "share";

  function xScale() { /* every chart: steps on a linear axis */
    return {type: "linear", title: {display: true, text: "step"},
            ticks: {maxTicksLimit: 8, callback: (v) => num(v)}, grid: grid()};
  }

  function yScale(meta) { /* ratios as percentages; shares stacked within [0, 1]; else the unit */
    const ratio = isRatio(meta);
    const y = {stacked: !!meta.stacked, grid: grid(),
               ticks: {callback: (v) => (ratio ? pctTick(v) : num(v)), maxTicksLimit: 6}};
    if (meta.unit === "share") { y.min = 0; y.max = 1; }
    if (meta.unit && !ratio) y.title = {display: true, text: meta.unit};
    return y;
  }

  function tooltip(meta) { /* "step N" over one line per series, in the axis' format */
    const ratio = isRatio(meta);
    return {callbacks: {
      title: (items) => (items.length ? "step " + items[0].parsed.x : ""),
      label: (it) => it.dataset.label + ": " + (ratio ? pct(it.parsed.y) : num(it.parsed.y)),
    }};
  }

  function chartOptions(meta) {
    return {
      animation: false, parsing: false, normalized: true, responsive: true,
      maintainAspectRatio: false, spanGaps: false,
      interaction: {mode: "nearest", axis: "x", intersect: false},
      scales: {x: xScale(), y: yScale(meta)},
      plugins: {
        legend: {position: "bottom", labels: {boxWidth: 14, boxHeight: 2, padding: 10}},
        tooltip: tooltip(meta),
      },
    };
  }

  function chartCard(meta) { /* <section><h2>title</h2><div><canvas></div></section> in #charts */
    const card = document.createElement("section");
    card.className = "card chart-card";
    card.dataset.chart = meta.id;
    const heading = document.createElement("h2");
    heading.textContent = meta.title || title(meta.id);
    const box = document.createElement("div");
    box.className = "chart-box";
    const canvas = document.createElement("canvas");
    box.appendChild(canvas);
    card.append(heading, box);
    $("charts").appendChild(card);
    return {card, heading, canvas};
  }

  function ensureChart(meta) {
    let c = state.charts.get(meta.id);
    if (c) {
      if (meta.title && meta.title !== c.meta.title) {
        c.meta = meta;
        c.heading.textContent = meta.title;
      }
      return c;
    }
    const {card, heading, canvas} = chartCard(meta);
    c = {meta, card, heading, datasets: [], byName: new Map(), dirty: true};
    c.chart = new Chart(canvas, {type: "line", data: {datasets: c.datasets},
                                 options: chartOptions(meta), plugins: [eventMarks]});
    state.charts.set(meta.id, c);
    return c;
  }

  function ensureSeries(c, name) {
    let d = c.byName.get(name);
    if (d) return d;
    const colour = colourOf(c, name);
    const derived = /^peer\d+\./.test(name); /* e.g. peer0.ema: the peer's colour, dashed */
    d = {label: name, data: [], borderColor: colour, backgroundColor: colour,
         borderWidth: name === "ensemble" ? 2.5 : c.meta.stacked ? 1 : 1.6, pointRadius: 0,
         pointHoverRadius: 3,
         tension: 0, borderDash: derived ? [5, 3] : []};
    if (c.meta.stacked) {
      d.fill = c.datasets.length === 0 ? "origin" : "-1";
      d.backgroundColor = colour + "66";
    }
    c.datasets.push(d);
    c.byName.set(name, d);
    c.chart.options.plugins.legend.display = c.datasets.length > 1 || !!c.meta.stacked;
    return d;
  }

  function thin(data) { /* keeps the points at even indices and the last one */
    const out = data.filter((_, i) => i % 2 === 0);
    if (data.length % 2 === 0) out.push(data[data.length - 1]);
    return out;
  }

  function addSeries(s) {
    const meta = state.charts.get(s.chart)?.meta || {id: s.chart, title: title(s.chart), unit: "", stacked: false};
    const c = ensureChart(meta);
    const d = ensureSeries(c, s.name);
    for (let i = 0; i < s.x.length; i++) {
      const y = s.y[i] === null ? NaN : s.y[i];
      const last = d.data[d.data.length - 1];
      if (last && last.x === s.x[i]) last.y = y; /* a point again at the same step: the newer */
      else d.data.push({x: s.x[i], y});
    }
    if (d.data.length > MAX_POINTS) d.data = thin(d.data);
    /* dots only where they stand apart (evaluations), lines alone on dense series */
    const width = c.chart.chartArea ? c.chart.chartArea.width : 400;
    d.pointRadius = !c.meta.stacked && width / d.data.length >= 12 ? 2.5 : 0;
    c.dirty = true;
  }

  function resetRun() {
    for (const c of state.charts.values()) { c.chart.destroy(); c.card.remove(); }
    state.charts.clear();
    state.events = [];
    state.seq = 0;
    $("events").replaceChildren();
  }

  /* ---- status, configuration, events ---- */
  function setState(text, kind) {
    const b = $("state");
    b.textContent = text;
    b.className = "badge badge-" + kind;
  }

  function figure(dl, label, value) {
    const div = document.createElement("div"), dt = document.createElement("dt"),
          dd = document.createElement("dd");
    dt.textContent = label;
    dd.textContent = value;
    div.append(dt, dd);
    dl.append(div);
  }

  function lastY(chartId, name) {
    const d = state.charts.get(chartId)?.byName.get(name);
    return d && d.data.length ? d.data[d.data.length - 1].y : null;
  }

  function showStatus(st, health) {
    if (st && st.mode === "serve") { /* kdpeers serve alone: predictions only, no training */
      $("run-title").textContent = "serving " + (st.run_dir || st.model || "");
      setState("serving", "done");
      return;
    }
    if (!st || !st.progress) return;
    const cfg = st.config || {}, pr = st.progress, ck = st.checkpoint || {};
    const peers = cfg.peers ?? "?", rpp = cfg.ranks_per_peer ?? 1;
    $("run-title").textContent = [cfg.method, cfg.arch,
      peers + " peer" + (peers === 1 ? "" : "s") + (rpp > 1 ? " × " + rpp + " ranks" : ""),
      cfg.dir].filter((v) => v !== undefined && v !== "").join(" · ");
    document.title = "kdpeers · " + (cfg.method || "") + " · step " + pr.step;
    const frac = pr.total_steps > 0 ? pr.step / pr.total_steps : 0;
    $("progress-fill").style.width = (100 * Math.min(1, frac)).toFixed(2) + "%";
    $("progress-text").textContent = "step " + pr.step + " / " + pr.total_steps +
      " · epoch " + num(pr.epoch) + " · ETA " + (pr.step >= pr.total_steps ? "done" : duration(pr.eta_seconds));
    const dl = $("figures");
    dl.replaceChildren();
    const best = Object.entries(st.eval || {}).sort((a, b) => (b[1].acc ?? 0) - (a[1].acc ?? 0))[0];
    if (best) figure(dl, "best test accuracy", pct(best[1].acc) + " (" + best[0] + ")");
    const sps = lastY("throughput", "steps/s");
    if (sps !== null) figure(dl, "steps/s", num(sps));
    const lr = lastY("learning_rate", "lr");
    if (lr !== null) figure(dl, "learning rate", num(lr));
    figure(dl, "lr scale · T · kd weight", num(pr.lr_scale) + " · " + num(pr.temperature) + " · " + num(pr.kd_weight));
    figure(dl, "last checkpoint", ck.last_step >= 0 ? "step " + ck.last_step + ", " + duration(ck.age_seconds) + " ago" : "none yet");
    figure(dl, "train time", duration(pr.train_seconds));
    const sick = health && health.status !== "ok";
    $("health").hidden = !sick;
    if (sick) $("health").textContent = "Unhealthy: " + (health.reason || "ranks are late");
    if (sick) setState("stalled", "bad");
    else if (pr.step >= pr.total_steps && pr.total_steps > 0) setState("finished", "done");
    else if (pr.paused) setState("paused", "warn");
    else setState("training", "ok");
    showConfig(st);
    $("summary").hidden = false;
    $("details").hidden = false;
  }

  function showConfig(st) {
    const rows = [];
    for (const [k, v] of Object.entries(st.config || {}))
      rows.push([k, Array.isArray(v) ? v.join(", ") : String(v)]);
    const ck = st.checkpoint || {};
    if (ck.every_steps > 0) rows.push(["checkpoint every", ck.every_steps + " steps"]);
    if (ck.every_minutes > 0) rows.push(["checkpoint every", ck.every_minutes + " min"]);
    if (st.progress && st.progress.metrics_lines_lost) rows.push(["metrics lines lost", String(st.progress.metrics_lines_lost)]);
    const table = $("config");
    table.replaceChildren(...rows.map(([k, v]) => {
      const tr = document.createElement("tr"), th = document.createElement("th"), td = document.createElement("td");
      th.textContent = k.replace(/_/g, " ");
      td.textContent = v;
      tr.append(th, td);
      return tr;
    }));
  }

  function addEvents(evs) {
    const list = $("events");
    for (const e of evs) {
      state.events.push(e);
      const li = document.createElement("li");
      const kind = document.createElement("span");
      kind.className = "event-kind";
      kind.style.borderColor = EVENT_COLOURS[e.kind] || "#999999";
      kind.textContent = e.kind;
      const when = new Date(e.unix_time * 1000);
      li.append(kind, document.createTextNode(" step " + e.x + (e.text ? " · " + e.text : "") +
        " · " + when.toLocaleTimeString()));
      list.prepend(li);
    }
    while (list.children.length > 200) list.lastChild.remove();
    if (state.events.length > 1000) state.events = state.events.slice(-1000);
    $("no-events").hidden = state.events.length > 0;
    if (evs.length) for (const c of state.charts.values()) c.dirty = true;
  }

  /* ---- the token ---- */
  function askToken(wrong) {
    state.waitingForToken = true;
    setState("token needed", "warn");
    $("run-title").textContent = "this run's server needs its token";
    $("token-form").hidden = false;
    $("token-error").hidden = !wrong;
    $("token-error").textContent = wrong ? "That token was refused." : "";
    $("token-input").focus();
  }

  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = $("token-input");
    state.token = input.value.trim();
    input.value = "";
    if (!state.token) return;
    sessionStorage.setItem(TOKEN_KEY, state.token);
    $("token-form").hidden = true;
    state.waitingForToken = false;
    schedule(0);
  });

  $("forget-token").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = "";
    $("forget-token").hidden = true;
    resetRun();
    schedule(0);
  });

  /* ---- polling ---- */
  function schedule(ms) {
    clearTimeout(state.timer);
    state.timer = setTimeout(poll, ms);
  }

  async function poll() {
    const headers = state.token ? {Authorization: "Bearer " + state.token} : {};
    let reply;
    try {
      const r = await fetch("/history?since=" + state.seq, {headers, cache: "no-store"});
      if (r.status === 401) {
        askToken(!!state.token);
        return; /* until a token is entered */
      }
      if (!r.ok) throw new Error("HTTP " + r.status);
      reply = await r.json();
    } catch (err) {
      state.failures++;
      setState(state.lastOk ? "disconnected" : "no server", "wait");
      $("updated").textContent = "cannot reach the server (" + err.message + "): the run may have ended; retrying";
      schedule(Math.min(MAX_RETRY_MS, POLL_MS * 2 ** Math.min(state.failures, 4)));
      return;
    }
    state.failures = 0;
    state.polls++;
    state.lastOk = Date.now();
    if (reply.run_id !== state.runId) { /* first reply, or the server restarted */
      resetRun();
      state.runId = reply.run_id;
    }
    for (const meta of reply.charts || []) ensureChart(meta);
    for (const s of reply.series || []) addSeries(s);
    addEvents(reply.events || []);
    state.status = reply.status;
    state.seq = reply.seq;
    for (const c of state.charts.values()) {
      if (!c.dirty) continue;
      c.card.hidden = c.datasets.length === 0;
      c.chart.update("none");
      c.dirty = false;
    }
    showStatus(reply.status, reply.health);
    $("forget-token").hidden = !state.token;
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    schedule(document.hidden ? HIDDEN_POLL_MS : POLL_MS);
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && !state.waitingForToken) schedule(0);
  });
  poll();
})();
