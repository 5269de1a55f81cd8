/* Deployments: live figures read from /metrics (Prometheus text), and the "try it" box that sends
 * an Open Inference Protocol request to /v2/models/{name}/infer and shows the answer. */
"use strict";

(() => {
  const POLL_MS = 2000;
  const WINDOW_MS = 60000;
  const snapshots = []; // [{t, series: Map(key -> {requests, failures, buckets, count, sum, batchSum, batchCount})}]

  // --- Prometheus text ------------------------------------------------------------------------
  function parseLabels(text) {
    const labels = {};
    const re = /(\w+)="((?:[^"\\]|\\.)*)"/g;
    let m;
    while ((m = re.exec(text))) labels[m[1]] = m[2].replace(/\\(.)/g, "$1");
    return labels;
  }

  // The kiln_inference_* series of one scrape, per (model, version).
  function parseMetrics(text) {
    const series = new Map();
    const get = (labels) => {
      const key = `${labels.model}\u0000${labels.version}`;
      if (!series.has(key)) {
        series.set(key, { requests: 0, failures: 0, buckets: new Map(), count: 0, sum: 0, batchSum: 0, batchCount: 0 });
      }
      return series.get(key);
    };
    for (const line of text.split("\n")) {
      if (!line.startsWith("kiln_inference_")) continue;
      const m = line.match(/^(\w+)(?:\{(.*)\})?\s+(\S+)/);
      if (!m) continue;
      const [, name, labelText, raw] = m;
      const labels = parseLabels(labelText || "");
      if (labels.model === undefined) continue;
      const value = Number(raw);
      const s = get(labels);
      if (name === "kiln_inference_requests_total") s.requests += value;
      else if (name === "kiln_inference_failures_total") s.failures += value;
      else if (name === "kiln_inference_request_duration_seconds_bucket") s.buckets.set(labels.le, value);
      else if (name === "kiln_inference_request_duration_seconds_count") s.count = value;
      else if (name === "kiln_inference_request_duration_seconds_sum") s.sum = value;
      else if (name === "kiln_inference_batch_size_sum") s.batchSum = value;
      else if (name === "kiln_inference_batch_size_count") s.batchCount = value;
    }
    return series;
  }

  // histogram_quantile as Prometheus computes it: linear inside the bucket the rank falls in.
  function quantile(q, buckets) {
    const bounds = [...buckets.entries()].map(([le, c]) => [le === "+Inf" ? Infinity : Number(le), c])
      .sort((a, b) => a[0] - b[0]);
    if (!bounds.length) return null;
    const total = bounds[bounds.length - 1][1];
    if (!(total > 0)) return null;
    const rank = q * total;
    let prevBound = 0;
    let prevCount = 0;
    for (const [bound, count] of bounds) {
      if (count >= rank) {
        if (bound === Infinity) return prevBound; // beyond the largest bucket: its bound is all we know
        const inBucket = count - prevCount;
        return inBucket > 0 ? prevBound + (bound - prevBound) * ((rank - prevCount) / inBucket) : bound;
      }
      prevBound = bound;
      prevCount = count;
    }
    return prevBound;
  }

  function minus(a, b) {
    if (!b) return a;
    const buckets = new Map();
    for (const [le, c] of a.buckets) buckets.set(le, c - (b.buckets.get(le) || 0));
    return {
      requests: a.requests - b.requests, failures: a.failures - b.failures, buckets,
      count: a.count - b.count, sum: a.sum - b.sum, batchSum: a.batchSum - b.batchSum, batchCount: a.batchCount - b.batchCount,
    };
  }

  const fmt = (v, digits) => (v === null || v === undefined || !isFinite(v) ? "—" : Number(v.toPrecision(digits || 3)).toString());

  function show() {
    if (!snapshots.length) return;
    const latest = snapshots[snapshots.length - 1];
    const oldest = snapshots[0];
    const seconds = (latest.t - oldest.t) / 1000;
    document.querySelectorAll("tr[data-metrics-model]").forEach((tr) => {
      const key = `${tr.dataset.metricsModel}\u0000${tr.dataset.metricsVersion}`;
      const now = latest.series.get(key);
      const cell = (name) => tr.querySelector(`[data-figure=${name}]`);
      if (!now) {
        ["rps", "p50", "p99", "batch", "errors"].forEach((n) => { cell(n).textContent = "—"; });
        cell("requests").textContent = "0";
        return;
      }
      const before = oldest.series.get(key);
      const recent = seconds > 0 ? minus(now, before) : null;
      // Figures over the last minute when it had requests; otherwise since this server started, greyed.
      const windowed = recent && recent.count > 0;
      const basis = windowed ? recent : now;
      const stale = !windowed;
      cell("rps").textContent = recent ? fmt(recent.requests / seconds, 3) : "—";
      const p50 = quantile(0.5, basis.buckets);
      const p99 = quantile(0.99, basis.buckets);
      cell("p50").textContent = p50 === null ? "—" : fmt(p50 * 1000);
      cell("p99").textContent = p99 === null ? "—" : fmt(p99 * 1000);
      cell("batch").textContent = basis.batchCount > 0 ? fmt(basis.batchSum / basis.batchCount, 3) : "—";
      cell("errors").textContent = `${now.failures}`;
      cell("requests").textContent = `${now.requests}`;
      for (const n of ["p50", "p99", "batch"]) {
        cell(n).classList.toggle("stale", stale);
        cell(n).title = stale ? "no requests in the last minute: since this server started" : "over the last minute";
      }
      cell("errors").classList.toggle("error-text", now.failures > 0);
    });
  }

  async function poll() {
    if (document.hidden) return;
    try {
      const r = await fetch("/metrics", { credentials: "same-origin" });
      if (!r.ok) return;
      const t = Date.now();
      snapshots.push({ t, series: parseMetrics(await r.text()) });
      while (snapshots.length > 2 && t - snapshots[1].t >= WINDOW_MS) snapshots.shift();
      show();
    } catch (_) {
      // the next poll tries again
    }
  }

  // --- try it ---------------------------------------------------------------------------------
  // "<N random values in [lo, hi)>" placeholders become N values of the input's datatype.
  function fillPlaceholders(body) {
    for (const input of body.inputs || []) {
      const m = typeof input.data === "string" && input.data.match(/^<(\d+) random values in \[(-?[\d.e+-]+), (-?[\d.e+-]+)\)>$/);
      if (!m) continue;
      const [n, lo, hi] = [Number(m[1]), Number(m[2]), Number(m[3])];
      const integer = /INT|BOOL/.test(input.datatype);
      input.data = Array.from({ length: n }, () => {
        const v = lo + Math.random() * (hi - lo);
        return integer ? Math.floor(v) : Math.round(v * 1e4) / 1e4;
      });
    }
    return body;
  }

  function summarize(container, data) {
    container.replaceChildren();
    for (const out of data.outputs || []) {
      const box = document.createElement("div");
      box.className = "output";
      box.dataset.output = out.name;
      const head = document.createElement("div");
      head.className = "output-head";
      head.innerHTML = "<strong class=mono></strong><span class=chip></span><span class=muted></span>";
      head.children[0].textContent = out.name;
      head.children[1].textContent = out.datatype;
      head.children[2].textContent = `shape [${out.shape.join(", ")}]`;
      box.appendChild(head);
      const values = Array.isArray(out.data) ? out.data.flat(Infinity) : [];
      const last = out.shape[out.shape.length - 1];
      if (out.shape.length === 2 && last > 1 && values.length === out.shape[0] * last) {
        const best = [];
        for (let r = 0; r < out.shape[0]; r++) {
          const row = values.slice(r * last, (r + 1) * last);
          best.push(row.indexOf(Math.max(...row)));
        }
        const top = document.createElement("div");
        top.className = "top1";
        top.textContent = `argmax per row: ${best.join(", ")}`;
        box.appendChild(top);
      }
      const shown = document.createElement("div");
      shown.className = "values";
      const head10 = values.slice(0, 10).map((v) => (typeof v === "number" ? Number(v.toPrecision(4)) : v));
      shown.textContent = `[${head10.join(", ")}${values.length > 10 ? `, … ${values.length - 10} more` : ""}]`;
      box.appendChild(shown);
      container.appendChild(box);
    }
  }

  function bindTryIt() {
    document.addEventListener("click", async (event) => {
      const button = event.target.closest("[data-send]");
      if (!button) return;
      const box = button.closest("[data-tryit]");
      const name = box.dataset.tryit;
      const version = box.querySelector("select[name=version]").value;
      const meta = box.querySelector("[data-field=response-meta]");
      const summary = box.querySelector("[data-field=response-summary]");
      const raw = box.querySelector("[data-field=response-raw]");
      let body;
      try {
        body = fillPlaceholders(JSON.parse(box.querySelector("textarea").value));
      } catch (err) {
        summary.innerHTML = "<div class=response-error></div>";
        summary.firstChild.textContent = `The request is not valid JSON: ${err.message}`;
        return;
      }
      const url = `/v2/models/${encodeURIComponent(name)}${version ? `/versions/${version}` : ""}/infer`;
      button.disabled = true;
      const started = performance.now();
      try {
        const { status, data, text } = await Kiln.api("POST", url, body);
        meta.textContent = `HTTP ${status} · ${(performance.now() - started).toFixed(1)} ms · v${data.model_version}`;
        summarize(summary, data);
        raw.textContent = text.length > 20000 ? `${text.slice(0, 20000)}…` : text;
        poll();
      } catch (err) {
        meta.textContent = err.status ? `HTTP ${err.status}` : "";
        summary.innerHTML = "<div class=response-error></div>";
        summary.firstChild.textContent = err.message;
        raw.textContent = err.body ? JSON.stringify(err.body, null, 2) : "";
      } finally {
        button.disabled = false;
      }
    });
  }

  bindTryIt();
  document.addEventListener("kiln:refreshed", show);
  poll();
  setInterval(poll, POLL_MS);
})();
