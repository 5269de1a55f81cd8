/* Models: upload a bundle (POST /v1/models, multipart) and start its conversion (POST /v1/jobs);
 * or start a conversion of an existing version from the "Convert…" dialog. */
"use strict";

(() => {
  const field = (form, name) => form.elements.namedItem(name);

  // The job request the options fields describe (service/schemas.py JobCreate).
  function jobOptions(form) {
    const checked = (name) => [...form.querySelectorAll(`input[name="${name}"]:checked`)].map((i) => i.value);
    const options = { targets: checked("targets"), precisions: checked("precisions"), policy: field(form, "policy").value };
    const bench = field(form, "bench_seconds").value;
    if (bench !== "") options.bench_seconds = Number(bench);
    const threads = field(form, "threads").value;
    if (threads !== "") options.threads = Number(threads);
    const batches = field(form, "batch_sizes").value.trim();
    if (batches) options.batch_sizes = batches.split(",").map((b) => Number(b.trim()));
    return options;
  }

  async function startJob(model, version, options) {
    const { data } = await Kiln.api("POST", "/v1/jobs", Object.assign({ model, version }, options));
    return data;
  }

  function bindUpload() {
    const form = document.getElementById("upload-form");
    const state = form.querySelector("[data-field=upload-state]");
    const startBox = field(form, "start_job");
    const jobOptionsBox = form.querySelector(".job-options");
    startBox.addEventListener("change", () => jobOptionsBox.classList.toggle("disabled", !startBox.checked));

    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const upload = new FormData();
      upload.append("name", field(form, "name").value.trim());
      upload.append("file", field(form, "file").files[0]);
      for (const name of ["entry", "signature"]) {
        const value = field(form, name).value.trim();
        if (value) upload.append(name, value);
      }
      for (const name of ["weights", "samples"]) {
        const input = field(form, name);
        if (input.files.length) upload.append(name, input.files[0]);
      }
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      state.textContent = "Uploading…";
      try {
        const version = (await Kiln.api("POST", "/v1/models", upload)).data;
        if (!startBox.checked) {
          Kiln.flash(`Uploaded ${version.name} v${version.version}${version.existing ? " (identical to the newest version)" : ""}.`,
                     "success");
          form.reset();
          await Kiln.refresh();
          return;
        }
        state.textContent = "Starting the conversion…";
        try {
          const job = await startJob(version.name, version.version, jobOptions(form));
          Kiln.flashAfterReload(`Started job ${job.id.slice(0, 8)} for ${version.name} v${version.version}.`, "success");
          location.href = `/?highlight=${encodeURIComponent(job.id)}`;
        } catch (err) {
          // The model is in; only the job was refused. Say so, and show the new version.
          Kiln.showError(err);
          Kiln.flash(`${version.name} v${version.version} was uploaded; the conversion did not start.`, "info");
          await Kiln.refresh();
        }
      } catch (err) {
        Kiln.showError(err);
      } finally {
        button.disabled = false;
        state.textContent = "";
      }
    });
  }

  function bindConvert() {
    const dialog = document.getElementById("convert-dialog");
    const form = document.getElementById("convert-form");
    document.addEventListener("click", (event) => {
      const button = event.target.closest("[data-convert]");
      if (!button) return;
      field(form, "model").value = button.dataset.model;
      field(form, "version").value = button.dataset.version;
      form.querySelector("[data-field=convert-title]").textContent = `${button.dataset.model} v${button.dataset.version}`;
      dialog.showModal();
    });
    dialog.querySelector("[data-close]").addEventListener("click", () => dialog.close());
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        const job = await startJob(field(form, "model").value, Number(field(form, "version").value), jobOptions(form));
        location.href = `/jobs/${encodeURIComponent(job.id)}`;
      } catch (err) {
        Kiln.showError(err);
      }
    });
  }

  bindUpload();
  bindConvert();
  if (location.hash === "#upload") field(document.getElementById("upload-form"), "name").focus();
})();
