/* One job, live: while it is queued or running, its event stream (/v1/jobs/{id}/events) brings the
 * summary (`job`), log lines (`log`) and the end (`end`). Log lines are appended here; the rest of
 * the page (steps, candidates, charts) is rendered again by the server when the job changes. */
"use strict";

(() => {
  const root = document.getElementById("job");
  const id = root.dataset.jobId;
  const log = document.getElementById("log");
  let after = Number(log.dataset.after || 0);

  function appendLog(lines) {
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 24;
    let text = "";
    for (const l of lines) {
      if (l.seq <= after) continue;
      text += `[${l.step}] ${l.line}\n`;
      after = l.seq;
    }
    if (!text) return;
    log.append(text);
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  function update(job) {
    // The header at once, from the event; the rest with the next server render.
    const head = document.getElementById("job-head");
    const badge = head.querySelector("[data-field=status]");
    badge.textContent = job.status;
    badge.className = `badge status-${job.status}`;
    const pct = Math.round(job.progress * 100);
    const bar = head.querySelector("[data-field=progress]");
    if (bar) {
      bar.className = `progress status-${job.status}`;
      bar.querySelector(".bar").style.width = `${pct}%`;
      head.querySelector("[data-field=progress-text]").textContent = `${pct}%`;
    }
    const step = head.querySelector("[data-field=step]");
    if (step) step.textContent = job.current_step || "";
    Kiln.refreshSoon();
  }

  function follow() {
    const es = new EventSource(`/v1/jobs/${encodeURIComponent(id)}/events`);
    es.addEventListener("job", (e) => update(JSON.parse(e.data)));
    es.addEventListener("log", (e) => appendLog(JSON.parse(e.data)));
    es.addEventListener("end", () => {
      es.close();
      root.removeAttribute("data-active");
      Kiln.refresh();
    });
    window.addEventListener("pagehide", () => es.close());
  }

  // Deploy: POST /v1/deployments with the chosen candidate.
  function bindDeploy() {
    document.addEventListener("submit", async (event) => {
      const form = event.target;
      if (form.id !== "deploy-form") return;
      event.preventDefault();
      const field = (n) => form.elements.namedItem(n);
      const body = { name: field("name").value.trim(), candidate: field("candidate").value };
      const delay = field("max_queue_delay_ms").value;
      if (delay !== "") body.max_queue_delay_ms = Number(delay);
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      try {
        const { data } = await Kiln.api("POST", "/v1/deployments", body);
        const newest = data.versions[data.versions.length - 1];
        if (newest.state === "failed") {
          Kiln.flash(`${data.name} v${newest.version} did not load: ${newest.error}`, "error");
        } else {
          Kiln.flash(`Deployed ${newest.candidate_name} as ${data.name} v${newest.version} (${newest.state}).`,
                     "success", { link: { href: "/deployments", text: "Open deployments" }, timeout: 15000 });
        }
      } catch (err) {
        Kiln.showError(err);
      } finally {
        button.disabled = false;
      }
    });
  }

  bindDeploy();
  if (root.hasAttribute("data-active")) follow();
  log.scrollTop = log.scrollHeight;
})();
