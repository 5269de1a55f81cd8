"""The pipeline's bookkeeping, with tiny steps: records, skips, failures, resume."""

import pytest

from service.errors import ConversionError
from service.signature import Signature
from workers.context import BundleInfo, Context
from workers.pipeline import Canceled, Pipeline, SkipStep


class Recorder:
    def __init__(self, name, requires=(), action=None):
        self.name, self.requires, self.action, self.calls = name, requires, action, 0

    def run(self, ctx, log):
        self.calls += 1
        log.info(f"{self.name} ran")
        if self.action:
            self.action()
        return {"n": self.calls}


def _ctx(tmp_path):
    return Context(
        workdir=str(tmp_path),
        out_dir=str(tmp_path / "out"),
        bundle=BundleInfo(kind="python", root=str(tmp_path)),
        signature=Signature.parse({"inputs": ["x:float32[batch,4]"]}),
    )


def _raise(exc):
    def f():
        raise exc

    return f


def test_records_status_and_skips_dependents(tmp_path):
    a = Recorder("a")
    b = Recorder("b", ("a",), _raise(ConversionError("b broke")))
    c = Recorder("c", ("b",))
    d = Recorder("d", (), _raise(SkipStep("nothing to do")))
    ctx = Pipeline([a, b, c, d]).run(_ctx(tmp_path))
    status = {s.name: (s.status, s.error) for s in ctx.steps}
    assert status == {
        "a": ("ok", None),
        "b": ("failed", "b broke"),
        "c": ("skipped", "needs b, which did not succeed"),
        "d": ("skipped", "nothing to do"),
    }
    assert c.calls == 0
    assert "a ran" in ctx.step("a").log and ctx.step("a").outputs == {"n": 1}
    assert ctx.step("a").duration_s is not None


def test_a_bug_in_a_step_fails_the_step_not_the_caller(tmp_path):
    ctx = Pipeline([Recorder("a", (), _raise(ZeroDivisionError("oops")))]).run(_ctx(tmp_path))
    assert ctx.step("a").status == "failed" and "ZeroDivisionError" in ctx.step("a").error


def test_resume_runs_only_unfinished_steps(tmp_path):
    ctx = _ctx(tmp_path)
    a, b = Recorder("a"), Recorder("b", ("a",), _raise(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        Pipeline([a, b]).run(ctx)
    saved = Context.load(tmp_path)
    assert saved.step("a").status == "ok"
    a2, b2 = Recorder("a"), Recorder("b", ("a",))
    Pipeline([a2, b2]).run(saved)
    assert a2.calls == 0 and b2.calls == 1 and saved.step("b").status == "ok"


def test_cancel_between_steps(tmp_path):
    flag = {"stop": False}
    a = Recorder("a", (), lambda: flag.update(stop=True))
    b = Recorder("b")
    with pytest.raises(Canceled):
        Pipeline([a, b], canceled=lambda: flag["stop"]).run(_ctx(tmp_path))
    assert b.calls == 0
