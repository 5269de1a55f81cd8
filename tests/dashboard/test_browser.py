"""The dashboard in a real browser, against a real Kiln converting real models: upload through the
form, follow the job live, read the candidates table against the report, deploy, try it, roll
back, undeploy, cancel a running job, see a failure and retry it, see a trace hazard.

Screenshots of each page go to KILN_TEST_ARTIFACTS (default test-artifacts/) as dashboard-*.png.
The tests share one signed-in tab and run in file order; those that need the converted CNN (about
30 s on two cores, done once for the module) are marked slow."""

from __future__ import annotations

import json
import re
import time

import pytest

from service.dashboard import formatting
from tests.conftest import ZOO, zoo_signature

pytest.importorskip("playwright", reason="the dashboard tests need the playwright package")
from playwright.sync_api import TimeoutError as PageTimeout
from playwright.sync_api import expect

FAST = {"bench_seconds": 0.1, "threads": 1}
# A model that takes long to build, so there is time to cancel its job while it runs.
SLOW_MODEL = """
import time
from torch import nn


def build_model():
    time.sleep(120)
    return nn.Linear(4, 2)
"""
# A model whose build fails, as a missing checkpoint would; its message has markup, shown as text.
BROKEN_MODEL = """
from torch import nn


def build_model():
    raise FileNotFoundError("checkpoint <weights/final.safetensors> is missing from the bundle")
"""
SMALL_SIGNATURE = {"inputs": ["x:float32[batch,4]"], "outputs": ["y"], "dims": {"batch": [1, 2, 4]}}


def upload_and_start(kiln, name: str, source: str | bytes, filename: str, signature: dict, **options) -> str:
    """A model uploaded and its job started through the API (for tests about other pages)."""
    r = kiln.http.post(
        "/v1/models", data={"name": name, "signature": json.dumps(signature)}, files={"file": (filename, source)}
    )
    assert r.status_code in (200, 201), r.text
    r = kiln.http.post("/v1/jobs", json={"model": name, **options})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def mark_document(page) -> None:
    """A flag on this document: still there later means the page never reloaded."""
    page.evaluate("window.__sameDocument = true")


def same_document(page) -> bool:
    return page.evaluate("window.__sameDocument === true")


def requests_counted(kiln, model: str, version: int) -> int:
    """kiln_inference_requests_total of one deployment version, as /metrics has it now."""
    text = kiln.http.get("/metrics").text
    m = re.search(rf'^kiln_inference_requests_total{{model="{model}",version="{version}"}} (\S+)$', text, re.M)
    return int(float(m.group(1))) if m else 0


def shot(page, shots, name: str) -> None:
    page.screenshot(path=str(shots / f"dashboard-{name}.png"), full_page=True)


@pytest.fixture(scope="module")
def cnn_job(kiln, page, shots):
    """The zoo's small ResNet uploaded through the models page's form, for onnxruntime and
    torchscript at fp32 and int8; its job followed on the jobs page to the end without a reload.
    Returns (job id, what the page showed on the way)."""
    page.goto("/models")
    form = page.locator("#upload-form")
    form.locator("input[name=name]").fill("cnn")
    form.locator("input[name=file]").set_input_files(str(ZOO / "cnn.py"))
    form.locator("input[name=entry]").fill("cnn.py:build_small")
    form.locator("textarea[name=signature]").fill(json.dumps(zoo_signature("cnn", "SMALL_SIGNATURE")))
    for target in ("onnxruntime", "torchscript"):
        form.locator(f"input[name=targets][value={target}]").check()
    for precision in ("fp32", "int8"):
        form.locator(f"input[name=precisions][value={precision}]").check()
    form.locator("details.advanced summary").click()
    form.locator("input[name=bench_seconds]").fill(str(FAST["bench_seconds"]))
    form.locator("input[name=threads]").fill(str(FAST["threads"]))
    form.locator("button[type=submit]").click()
    try:
        page.wait_for_url(re.compile(r"/\?highlight="))
    except PageTimeout:
        errors = page.locator("#flash .flash-error").all_inner_texts()
        pytest.fail(f"the upload did not lead to the jobs page; the page says: {errors}")
    row = page.locator("tr.highlight")
    job_id = row.get_attribute("data-job")
    mark_document(page)
    seen = {"statuses": [], "steps": set(), "progress": set()}
    status = row.locator("[data-field=status]")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        seen["statuses"].append(status.inner_text())
        seen["steps"].add(row.locator("[data-field=step]").inner_text())
        seen["progress"].add(row.locator("[data-field=progress-text]").inner_text())
        if seen["statuses"][-1] == "running" and "jobs-live" not in seen and len(seen["steps"] - {"—"}) >= 2:
            shot(page, shots, "jobs-live")
            seen["jobs-live"] = True
        if seen["statuses"][-1] in ("succeeded", "failed", "canceled"):
            break
        page.wait_for_timeout(200)
    seen["same_document"] = same_document(page)
    return job_id, seen


def test_sign_in_and_out(kiln, browser, shots):
    """A bad token is refused with the API's reason; a good one opens the page asked for; signing
    out asks again."""
    context = browser.new_context(base_url=kiln.url, viewport={"width": 1440, "height": 700})
    try:
        tab = context.new_page()
        tab.goto("/models")
        expect(tab.locator("h1")).to_have_text("Sign in to Kiln")
        tab.fill("input[name=token]", "kiln_not-a-real-token")
        tab.click("#sign-in-form button[type=submit]")
        expect(tab.locator("#flash .flash-error")).to_contain_text("the token is unknown or revoked")
        expect(tab.locator("#flash .flash-error")).to_contain_text("HTTP 401")
        shot(tab, shots, "sign-in")
        tab.fill("input[name=token]", kiln.token)
        tab.click("#sign-in-form button[type=submit]")
        expect(tab.locator("h1")).to_have_text("Models")
        tab.get_by_role("button", name="Sign out").click()
        expect(tab.locator("h1")).to_have_text("Sign in to Kiln")
        assert not [c for c in context.cookies() if c["name"] == "kiln_session"]
    finally:
        context.close()


def test_api_errors_are_shown_with_their_detail(kiln, page):
    bad = {"inputs": ["image:float99[batch,3,32,32]"], "outputs": ["logits"]}
    r = kiln.http.post(
        "/v1/models",
        data={"name": "broken-sig", "signature": json.dumps(bad)},
        files={"file": ("cnn.py", (ZOO / "cnn.py").read_bytes())},
    )
    assert r.status_code == 400
    detail = r.json()["detail"]
    page.goto("/models")
    form = page.locator("#upload-form")
    form.locator("input[name=name]").fill("broken-sig")
    form.locator("input[name=file]").set_input_files(str(ZOO / "cnn.py"))
    form.locator("textarea[name=signature]").fill(json.dumps(bad))
    form.locator("button[type=submit]").click()
    error = page.locator("#flash .flash-error").last
    expect(error.locator(".flash-text")).to_have_text(detail)
    expect(error.locator(".flash-status")).to_have_text("HTTP 400")
    error.locator("button").click()


@pytest.mark.slow
def test_an_uploaded_model_converts_live_on_the_jobs_page(cnn_job, kiln):
    job_id, seen = cnn_job
    assert seen["statuses"][-1] == "succeeded", seen
    assert kiln.worker.finished.get(job_id) == "succeeded"
    assert "running" in seen["statuses"], "the row never showed the job running"
    assert seen["same_document"], "the jobs page reloaded instead of updating in place"
    assert len(seen["steps"] - {"—"}) >= 3, f"too few steps seen live: {seen['steps']}"
    assert len(seen["progress"]) >= 3 and "100%" in seen["progress"], seen["progress"]
    job = kiln.http.get(f"/v1/jobs/{job_id}").json()
    assert job["options"]["targets"] == ["onnxruntime", "torchscript"]
    assert job["options"]["precisions"] == ["fp32", "int8"]


@pytest.mark.slow
def test_job_page_shows_the_reports_numbers(cnn_job, kiln, page, shots):
    job_id, _ = cnn_job
    report = kiln.http.get(f"/v1/jobs/{job_id}/report").json()
    page.goto(f"/jobs/{job_id}")
    expect(page.locator("#job-head [data-field=status]")).to_have_text("succeeded")

    steps = page.locator("#job-steps details.step")
    assert steps.evaluate_all("els => els.map(e => e.dataset.step)") == [s["name"] for s in report["steps"]]
    assert page.locator("#job-steps details.step-ok").count() == len(report["steps"])

    table = page.locator("table.candidates-table")
    for cand in report["candidates"]:
        row = table.locator(f"tr[data-candidate='{cand['id']}']")
        validation = cand.get("validation")
        if cand["status"] != "built":
            assert row.get_attribute("data-result") == "not built"
            continue
        assert row.get_attribute("data-result") == ("pass" if validation["passed"] else "fail")
        outs = list(validation["outputs"].values())
        want = {
            "max_abs": max(o["max_abs"] for o in outs),
            "rel": max(o["rel"] for o in outs),
            "cosine": min(o["cosine"] for o in outs),
            "top1": min(o["top1"] for o in outs),
        }
        shown = {
            "max_abs": formatting.num,
            "rel": formatting.num,
            "cosine": formatting.cosine,
            "top1": formatting.percent,
        }
        for metric, value in want.items():
            cell = row.locator(f"[data-metric={metric}]")
            assert float(cell.get_attribute("data-value")) == value, (cand["id"], metric)
            assert cell.inner_text().strip() == shown[metric](value), (cand["id"], metric)
        assert row.locator("[data-metric=tolerance]").inner_text() == formatting.tolerance(outs[0]["tolerance"])
        for point in cand["benchmark"]:
            for q in ("p50", "p99"):
                cell = row.locator(f"[data-metric={q}][data-batch='{point['batch']}']")
                assert float(cell.get_attribute("data-value")) == point[f"{q}_ms"]
                assert cell.inner_text() == formatting.ms(point[f"{q}_ms"])
        speed = row.locator("[data-metric=speedup]")
        assert float(speed.get_attribute("data-value")) == cand["speedup"]
        text = speed.inner_text().strip()
        assert text.startswith(formatting.speedup(cand["speedup"]))
        interval = f"({formatting.speedup(cand['speedup_low'])}–{formatting.speedup(cand['speedup_high'])})"
        assert interval in text and text.endswith("noisy") == cand["noisy"], text
    # how the figures were taken, and which references cannot discriminate, as the report says
    conditions = report["benchmark_conditions"]
    expect(page.locator("[data-field=conditions]")).to_contain_text(
        f"Timed in {conditions['rounds']} interleaved rounds"
    )
    flagged = page.locator("[data-field=degenerate]").evaluate_all("els => els.map(e => e.dataset.output)")
    assert sorted(flagged) == sorted(report["degenerate"]), (flagged, report["degenerate"])

    eager = table.locator("tr[data-candidate=eager]")
    for point in report["eager_benchmark"]:
        assert (
            float(eager.locator(f"[data-metric=p50][data-batch='{point['batch']}']").get_attribute("data-value"))
            == point["p50_ms"]
        )

    winner = report["selection"]["candidate"]
    assert table.locator("tr.selected").get_attribute("data-candidate") == winner
    expect(page.locator("[data-field=selected]")).to_have_text(winner)
    expect(page.locator(".selection")).to_contain_text(report["selection"]["reason"])
    losers = [c for c in report["candidates"] if c["id"] != winner and c.get("lost_because")]
    for cand in losers:
        expect(page.locator(f".losers li[data-candidate='{cand['id']}']")).to_contain_text(cand["lost_because"])

    benchmarked = [c for c in report["candidates"] if c["benchmark"]]
    assert page.locator("svg.chart-latency g.series").count() == len(benchmarked) + 1  # and eager
    assert page.locator("svg.chart-tradeoff g.point").count() == len(benchmarked)
    assert page.locator("svg.chart-tradeoff g.eager").count() == 1
    assert page.locator("a[download][href$='/report']").count() == 1
    shot(page, shots, "job")


@pytest.mark.slow
def test_deploy_try_it_roll_back_and_undeploy(cnn_job, kiln, page, shots):
    job_id, _ = cnn_job
    job = kiln.http.get(f"/v1/jobs/{job_id}").json()
    winner = next(c for c in job["candidates"] if c["id"] == job["selected_candidate"])
    other = next(c for c in job["candidates"] if c["passed"] and c["id"] != winner["id"])

    page.goto(f"/jobs/{job_id}")
    deploy = page.locator("#deploy-form")
    assert deploy.locator("select[name=candidate]").input_value() == winner["id"]  # the selected one first
    deploy.locator("button[type=submit]").click()
    expect(page.locator("#flash .flash-success").last).to_contain_text(f"Deployed {winner['name']} as cnn v1 (ready)")
    deploy.locator("select[name=candidate]").select_option(other["id"])
    deploy.locator("button[type=submit]").click()
    expect(page.locator("#flash .flash-success").last).to_contain_text(f"Deployed {other['name']} as cnn v2 (ready)")

    page.goto("/deployments")
    card = page.locator("section[data-deployment=cnn]")
    expect(card.locator("tr.selected")).to_have_attribute("data-version", "2")
    card.get_by_role("button", name="Roll back").click()
    expect(page.locator("#flash .flash-success").last).to_contain_text("Rolled back cnn")
    expect(card.locator("tr.selected")).to_have_attribute("data-version", "1")
    assert kiln.http.get("/v1/deployments/cnn").json()["default_version"] == 1
    expect(card.locator("tr[data-version='1'] td").nth(1)).to_have_text(winner["name"])

    # try it: the box's request, as sent, answered as the API answers it
    before = requests_counted(kiln, "cnn", 1)
    example = card.locator(".tryit textarea").input_value()
    body = json.loads(example)
    assert [i["name"] for i in body["inputs"]] == ["image"] and body["inputs"][0]["shape"] == [1, 3, 32, 32]
    card.locator("[data-send]").click()
    output = card.locator(".response-summary .output[data-output=logits]")
    expect(output).to_contain_text("shape [1, 10]")
    expect(card.locator("[data-field=response-meta]")).to_contain_text("HTTP 200")
    direct = kiln.http.post("/v2/models/cnn/infer", json=body).json()
    logits = direct["outputs"][0]["data"]
    expect(output.locator(".top1")).to_have_text(f"argmax per row: {logits.index(max(logits))}")
    # live figures from /metrics: the requests counted on v1, with a latency
    v1 = card.locator("tr[data-version='1']")
    expect(v1.locator("[data-figure=requests]")).to_have_text(str(before + 2), timeout=10_000)  # the page's and ours
    expect(v1.locator("[data-figure=p50]")).not_to_have_text("—")
    expect(v1.locator("[data-figure=errors]")).to_have_text("0")
    # a request the model refuses: the /v2 error, as the API words it
    card.locator(".tryit textarea").fill(
        json.dumps({"inputs": [{"name": "image", "shape": [1, 3], "datatype": "FP32", "data": [0, 0, 0]}]})
    )
    card.locator("[data-send]").click()
    expect(card.locator(".response-error")).to_contain_text("the model takes rank 4")
    expect(card.locator("[data-field=response-meta]")).to_have_text("HTTP 400")
    card.locator(".tryit textarea").fill(example)
    card.locator("[data-send]").click()
    expect(card.locator("[data-field=response-meta]")).to_contain_text("HTTP 200")
    page.wait_for_timeout(2500)  # one more metrics poll for the screenshot
    shot(page, shots, "deployments")

    r = kiln.http.post("/v1/deployments", json={"name": "scratch", "candidate": other["id"]})
    assert r.status_code == 201, r.text
    page.reload()
    scratch = page.locator("section[data-deployment=scratch]")
    scratch.get_by_role("button", name="Undeploy").click()
    expect(scratch).to_have_count(0)
    expect(page.locator("#flash .flash-success")).to_contain_text("Undeployed scratch")
    assert kiln.http.get("/v1/deployments/scratch").status_code == 404


def test_cancel_a_running_job_from_its_page(kiln, page, shots):
    job_id = upload_and_start(kiln, "slow", SLOW_MODEL, "slow.py", SMALL_SIGNATURE, targets=["onnxruntime"])
    page.goto(f"/jobs/{job_id}")
    mark_document(page)
    head = page.locator("#job-head")
    expect(head.locator("[data-field=status]")).to_have_text("running", timeout=30_000)
    expect(page.locator("#job-steps details[data-step=load] .step-status")).to_have_text("running")
    head.get_by_role("button", name="Cancel").click()
    expect(head.locator("[data-field=status]")).to_have_text("canceled", timeout=30_000)
    expect(head.locator(".job-error")).to_have_text("canceled while running")
    assert same_document(page), "the job page reloaded instead of updating in place"
    assert kiln.http.get(f"/v1/jobs/{job_id}").json()["status"] == "canceled"
    expect(head.get_by_role("button", name="Retry")).to_be_visible()
    shot(page, shots, "job-canceled")


def test_a_failed_step_shows_its_log_and_the_job_can_be_retried(kiln, page, shots):
    job_id = upload_and_start(kiln, "broken", BROKEN_MODEL, "broken.py", SMALL_SIGNATURE, targets=["onnxruntime"])
    page.goto(f"/jobs/{job_id}")
    head = page.locator("#job-head")
    expect(head.locator("[data-field=status]")).to_have_text("failed", timeout=60_000)
    expect(head.locator(".job-error")).to_contain_text("checkpoint <weights/final.safetensors> is missing")
    step = page.locator("#job-steps details.step-failed")
    expect(step).to_have_attribute("data-step", "load")
    expect(step.locator(".step-error")).to_contain_text("is missing from the bundle")
    step.locator("summary").click()
    expect(step.locator(".log-excerpt")).to_be_visible()
    expect(step.locator(".log-excerpt")).to_contain_text("FileNotFoundError")
    shot(page, shots, "job-failed")

    head.get_by_role("button", name="Retry").click()
    page.wait_for_url(re.compile(r"/jobs/(?!" + job_id + r")[0-9a-f]{32}$"))
    new_head = page.locator("#job-head")
    expect(new_head.locator("a[href='/jobs/" + job_id + "']")).to_be_visible()  # "retry of"
    expect(new_head.locator("[data-field=status]")).to_have_text("failed", timeout=60_000)


def test_a_frozen_branch_is_shown_with_what_kiln_did(kiln, page, shots):
    job_id = upload_and_start(
        kiln,
        "controlflow",
        (ZOO / "controlflow.py").read_bytes(),
        "controlflow.py",
        zoo_signature("controlflow"),
        targets=["onnxruntime", "torchscript"],
        **FAST,
    )
    page.goto(f"/jobs/{job_id}")
    expect(page.locator("#job-head [data-field=status]")).to_have_text("succeeded", timeout=120_000)
    hazards = {h["kind"]: h for h in kiln.http.get(f"/v1/jobs/{job_id}").json()["hazards"]}
    # the trace froze the branch; torch.export could not keep it (the report says where and what to write)
    assert sorted(hazards) == ["frozen_branch", "value_branch"]
    callout = page.locator(".callout.hazard[data-hazard=frozen_branch]")
    expect(callout).to_contain_text("Trace hazard: frozen branch")
    expect(callout).to_contain_text(hazards["frozen_branch"]["detail"])
    expect(callout).to_contain_text("What Kiln did: " + hazards["frozen_branch"]["action"])
    expect(page.locator(".callout.hazard[data-hazard=value_branch]")).to_contain_text("torch.cond")
    expect(page.locator(".captures")).to_contain_text("trace: disagrees")
    shot(page, shots, "job-hazard")


@pytest.mark.slow
def test_models_page_and_job_filters(cnn_job, kiln, page, shots):
    page.goto("/models")
    cnn = page.locator("tbody[data-model=cnn]")
    expect(cnn).to_contain_text("image: float32[batch, 3, 32, 32]")
    expect(cnn).to_contain_text("cnn.py:build_small")
    expect(cnn).to_contain_text("batch 1…4")
    shot(page, shots, "models")

    # the convert dialog starts a job of an existing version
    cnn.get_by_role("button", name="Convert…").click()
    dialog = page.locator("#convert-dialog")
    dialog.locator("input[name=targets][value=torchscript]").uncheck()
    dialog.get_by_role("button", name="Start job").click()
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f]{32}$"))
    new_id = page.url.rsplit("/", 1)[1]
    assert kiln.http.get(f"/v1/jobs/{new_id}").json()["options"]["targets"] == ["onnxruntime"]
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#job-head [data-field=status]")).to_have_text("canceled", timeout=30_000)

    # Pages of two need four jobs or more, whichever tests ran before this one: top up with jobs
    # canceled at once (a cancel ends a job whether it is still queued or already running).
    while kiln.http.get("/v1/jobs", params={"limit": 1}).json()["total"] < 4:
        extra = kiln.http.post("/v1/jobs", json={"model": "cnn", "targets": ["onnxruntime"]})
        assert extra.status_code == 202, extra.text
        assert kiln.http.post(f"/v1/jobs/{extra.json()['id']}/cancel").status_code == 202
    all_jobs = kiln.http.get("/v1/jobs", params={"limit": 500}).json()
    page.goto("/?status=succeeded")
    statuses = page.locator("table.jobs-table tbody [data-field=status]").all_inner_texts()
    assert statuses and set(statuses) == {"succeeded"}
    page.goto("/")
    page.locator("select[name=model]").select_option("cnn")
    page.wait_for_url(re.compile(r"model=cnn"))
    cnn_rows = [j for j in all_jobs["items"] if j["model"] == "cnn"]
    expect(page.locator("table.jobs-table tbody tr[data-job]")).to_have_count(len(cnn_rows))

    page.goto("/?limit=2")
    expect(page.locator("table.jobs-table tbody tr[data-job]")).to_have_count(2)
    expect(page.locator("[data-field=count]")).to_have_text(f"1–2 of {all_jobs['total']} jobs")
    page.locator("a[rel=next]").click()
    expect(page.locator("[data-field=count]")).to_have_text(f"3–4 of {all_jobs['total']} jobs")
    shown = page.locator("table.jobs-table tbody tr[data-job]").evaluate_all("rows => rows.map(r => r.dataset.job)")
    assert shown == [j["id"] for j in all_jobs["items"][2:4]]

    page.goto("/")
    expect(page.locator(f"tr[data-job='{cnn_job[0]}'] [data-field=status]")).to_have_text("succeeded")
    shot(page, shots, "jobs")
