/* Kiln dashboard: helpers every page uses.
 *
 * - Kiln.api(): every state-changing action goes through the /v1 (or /v2) API with fetch(), with the
 *   session's CSRF token (the <meta name="csrf-token"> tag) when one is set, never a token in a URL.
 *   A failed call raises Kiln.ApiError carrying the API's own `detail` (or `error` on /v2).
 * - Kiln.flash(): messages; errors stay until closed.
 * - Kiln.refresh(): fetch this page again and swap its [data-region] parts: the server renders,
 *   the browser only decides when.
 * - Buttons with data-action/data-url call the API (see bindActions).
 * - <time data-ago> and [data-since] are shown in local, relative form and kept current.
 */
"use strict";

const Kiln = (() => {
  class ApiError extends Error {
    constructor(status, detail, body) {
      super(detail);
      this.status = status;
      this.body = body;
    }
  }

  function headers(extra) {
    const h = Object.assign({ Accept: "application/json" }, extra || {});
    const meta = document.querySelector('meta[name="csrf-token"]');
    if (meta && meta.content) h["X-CSRF-Token"] = meta.content;
    return h;
  }

  async function api(method, url, body, extraHeaders) {
    const init = { method, credentials: "same-origin", headers: headers(extraHeaders) };
    if (body instanceof FormData) {
      init.body = body;
    } else if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = typeof body === "string" ? body : JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(url, init);
    } catch (err) {
      throw new ApiError(0, `Kiln could not be reached (${err.message})`, null);
    }
    const text = await response.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (!response.ok) {
      let detail = data && (data.detail !== undefined ? data.detail : data.error);
      if (detail === undefined || detail === null) detail = text || response.statusText;
      throw new ApiError(response.status, typeof detail === "string" ? detail : JSON.stringify(detail), data);
    }
    return { status: response.status, data, text, headers: response.headers };
  }

  // --- messages -------------------------------------------------------------------------------
  function flash(message, kind, options) {
    const opts = options || {};
    const area = document.getElementById("flash");
    const box = document.createElement("div");
    box.className = `flash flash-${kind || "info"}`;
    box.setAttribute("role", kind === "error" ? "alert" : "status");
    if (opts.status) {
      const s = document.createElement("span");
      s.className = "flash-status";
      s.textContent = `HTTP ${opts.status}`;
      box.appendChild(s);
    }
    const text = document.createElement("div");
    text.className = "flash-text";
    text.textContent = message;
    if (opts.link) {
      const a = document.createElement("a");
      a.href = opts.link.href;
      a.textContent = opts.link.text;
      text.append(" ", a);
    }
    box.appendChild(text);
    const close = document.createElement("button");
    close.type = "button";
    close.setAttribute("aria-label", "dismiss");
    close.textContent = "×";
    close.addEventListener("click", () => box.remove());
    box.appendChild(close);
    area.appendChild(box);
    if (kind !== "error") setTimeout(() => box.remove(), opts.timeout || 6000);
    return box;
  }

  function showError(err) {
    return flash(err.message, "error", { status: err.status || undefined });
  }

  // A message that must survive a reload (after "undeploy", for example).
  function flashAfterReload(message, kind) {
    sessionStorage.setItem("kiln.flash", JSON.stringify({ message, kind }));
  }

  // --- times ----------------------------------------------------------------------------------
  function formatDuration(s) {
    if (s === null || s === undefined || isNaN(s)) return "—";
    if (s < 0.001) return "<1 ms";
    if (s < 1) return `${Math.round(s * 1000)} ms`;
    if (s < 60) return `${Number(s.toPrecision(3))} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${Math.floor(s % 60)} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }

  function ago(date) {
    const s = (Date.now() - date.getTime()) / 1000;
    if (s < 5) return "just now";
    if (s < 60) return `${Math.floor(s)} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
  }

  function renderTimes(root) {
    (root || document).querySelectorAll("time[data-ago]").forEach((t) => {
      const d = new Date(t.dateTime);
      if (isNaN(d)) return;
      t.title = d.toLocaleString();
      t.textContent = ago(d);
    });
    (root || document).querySelectorAll("[data-since]").forEach((el) => {
      el.textContent = formatDuration((Date.now() - Date.parse(el.dataset.since)) / 1000);
    });
  }

  // --- regions --------------------------------------------------------------------------------
  let refreshing = null;
  let lastRefresh = 0;
  let pending = null;

  async function refresh() {
    if (refreshing) return refreshing;
    refreshing = (async () => {
      try {
        const r = await fetch(location.href, { credentials: "same-origin", headers: { Accept: "text/html" } });
        if (!r.ok) return;
        const doc = new DOMParser().parseFromString(await r.text(), "text/html");
        document.querySelectorAll("[data-region]").forEach((el) => {
          const fresh = doc.getElementById(el.id);
          if (!fresh) return;
          // keep what the reader opened open
          const open = new Set([...el.querySelectorAll("details[open][id]")].map((d) => d.id));
          open.forEach((id) => { const d = fresh.querySelector(`#${CSS.escape(id)}`); if (d) d.open = true; });
          el.replaceWith(fresh);
        });
        renderTimes();
        document.dispatchEvent(new CustomEvent("kiln:refreshed"));
      } catch (_) {
        // the next event or tick tries again
      } finally {
        lastRefresh = Date.now();
        refreshing = null;
      }
    })();
    return refreshing;
  }

  // At most one refresh a second however many events arrive.
  function refreshSoon() {
    if (pending) return;
    const wait = Math.max(0, 1000 - (Date.now() - lastRefresh));
    pending = setTimeout(() => { pending = null; refresh(); }, wait || 150);
  }

  // --- action buttons -------------------------------------------------------------------------
  // <button data-action="POST" data-url="/v1/jobs/ID/cancel" data-confirm="…" data-success="…"
  //         data-body='{"json": 1}' data-then="refresh | reload | /jobs/{id}">
  function bindActions() {
    document.addEventListener("click", async (event) => {
      const button = event.target.closest("[data-action][data-url]");
      if (!button || button.disabled) return;
      event.preventDefault();
      if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
      button.classList.add("busy");
      try {
        const body = button.dataset.body ? JSON.parse(button.dataset.body) : undefined;
        const result = await api(button.dataset.action, button.dataset.url, body);
        const then = button.dataset.then || "refresh";
        const message = button.dataset.success;
        if (then === "reload") {
          if (message) flashAfterReload(message, "success");
          location.reload();
        } else if (then.startsWith("/")) {
          if (message) flashAfterReload(message, "success");
          location.href = then.replace(/\{(\w+)\}/g, (_, key) => encodeURIComponent((result.data || {})[key]));
        } else {
          if (message) flash(message, "success");
          await refresh();
        }
      } catch (err) {
        showError(err);
      } finally {
        button.classList.remove("busy");
      }
    });
  }

  // Forms marked data-autosubmit (the filters) submit when a select changes.
  function bindAutosubmit() {
    document.querySelectorAll("form[data-autosubmit] select").forEach((s) => {
      s.addEventListener("change", () => s.form.submit());
    });
  }

  // Signing in keeps the token in an HttpOnly cookie (service/dashboard/session.py); then the page loads again.
  function bindSession() {
    const form = document.getElementById("sign-in-form");
    if (form) {
      form.addEventListener("submit", async (event) => {
        event.preventDefault();
        try {
          await api("POST", "/dashboard/session", { token: form.elements.namedItem("token").value.trim() });
          location.reload();
        } catch (err) {
          showError(err);
        }
      });
    }
    const out = document.querySelector("[data-sign-out]");
    if (out) {
      out.addEventListener("click", async () => {
        try {
          await api("DELETE", "/dashboard/session");
          location.href = "/";
        } catch (err) {
          showError(err);
        }
      });
    }
  }

  function start() {
    const saved = sessionStorage.getItem("kiln.flash");
    if (saved) {
      sessionStorage.removeItem("kiln.flash");
      try { const f = JSON.parse(saved); flash(f.message, f.kind); } catch (_) { /* ignore */ }
    }
    bindActions();
    bindAutosubmit();
    bindSession();
    renderTimes();
    setInterval(() => renderTimes(), 1000);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();

  return { api, ApiError, flash, showError, flashAfterReload, refresh, refreshSoon, renderTimes, formatDuration };
})();
