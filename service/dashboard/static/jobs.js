/* The jobs list, live: each queued or running job on the page is followed over its event stream
 * (/v1/jobs/{id}/events), its row updated as events arrive; when a job changes status or ends, the
 * list is rendered again by the server. A slow tick picks up jobs started elsewhere. */
"use strict";

(() => {
  // Browsers allow about six connections per server over HTTP/1.1; keep room for the page's fetches.
  const MAX_STREAMS = 4;
  const TICK_MS = 5000;
  const streams = new Map();

  const row = (id) => document.querySelector(`tr[data-job="${CSS.escape(id)}"]`);

  function update(id, job) {
    const tr = row(id);
    if (!tr) return;
    const changed = tr.dataset.status !== job.status;
    tr.dataset.status = job.status;
    const badge = tr.querySelector("[data-field=status]");
    badge.textContent = job.status;
    badge.className = `badge status-${job.status}`;
    const pct = Math.round(job.progress * 100);
    const bar = tr.querySelector("[data-field=progress]");
    bar.className = `progress status-${job.status}`;
    bar.setAttribute("aria-valuenow", pct);
    bar.querySelector(".bar").style.width = `${pct}%`;
    tr.querySelector("[data-field=progress-text]").textContent = `${pct}%`;
    tr.querySelector("[data-field=step]").textContent = job.current_step || "—";
    if (changed) Kiln.refreshSoon();
  }

  function follow(id) {
    const es = new EventSource(`/v1/jobs/${encodeURIComponent(id)}/events`);
    es.addEventListener("job", (e) => update(id, JSON.parse(e.data)));
    es.addEventListener("end", () => {
      es.close();
      streams.delete(id);
      Kiln.refresh();
    });
    es.onerror = () => {
      // A dropped stream reconnects by itself; a closed one (job gone) is let go.
      if (es.readyState === EventSource.CLOSED) streams.delete(id);
    };
    streams.set(id, es);
  }

  function attach() {
    for (const [id, es] of streams) {
      const tr = row(id);
      if (!tr || !tr.hasAttribute("data-active")) { es.close(); streams.delete(id); }
    }
    for (const tr of document.querySelectorAll("tr[data-job][data-active]")) {
      if (streams.size >= MAX_STREAMS) break;
      if (!streams.has(tr.dataset.job)) follow(tr.dataset.job);
    }
    document.getElementById("live").hidden = streams.size === 0;
  }

  document.addEventListener("kiln:refreshed", attach);
  attach();
  setInterval(() => { if (!document.hidden) Kiln.refresh(); }, TICK_MS);
  window.addEventListener("pagehide", () => streams.forEach((es) => es.close()));
})();
