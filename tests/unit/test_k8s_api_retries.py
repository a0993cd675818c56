"""call_api: transient answers (429, 5xx, dropped connections) are retried with backoff; answers no
retry can change (403, 422, 404) fail at once, naming verb, resource and object."""
from __future__ import annotations

import pytest
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import ProtocolError

from pipeline.launch import k8s_api
from pipeline.launch.k8s_api import KubernetesApiUnavailable, KubernetesLaunchError, call_api


class Script:
    """A fake API method answering from a list: exceptions are raised, anything else returned."""

    def __init__(self, *answers):
        self.answers, self.calls = list(answers), 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def _api_error(status: int, headers: dict | None = None) -> ApiException:
    err = ApiException(status=status, reason="x")
    err.headers = headers or {}
    err.body = '{"message": "m", "details": {"causes": [{"field": "spec.x"}]}}'
    return err


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch):
    waits = []
    monkeypatch.setattr(k8s_api.time, "sleep", waits.append)
    return waits


@pytest.mark.parametrize("transient", [_api_error(503), _api_error(500), _api_error(429),
                                       ProtocolError("Connection aborted.")])
def test_transient_answers_are_retried_with_backoff(transient, no_sleep):
    lines = []
    fn = Script(transient, transient, "ok")
    assert call_api("get", "jobs.batch", "ml", fn, log=lines.append) == "ok"
    assert fn.calls == 3 and no_sleep == [0.5, 1.0] and len(lines) == 2


def test_retry_after_is_honoured(no_sleep):
    call_api("list", "pods", "ml", Script(_api_error(429, {"Retry-After": "7"}), "ok"), log=lambda _: None)
    assert no_sleep == [7.0]


@pytest.mark.parametrize("status, words", [(403, "forbidden: cannot create jobs.batch"), (422, "field(s) spec.x"),
                                           (404, "HTTP 404")])
def test_permanent_answers_fail_at_once_naming_verb_and_object(status, words):
    fn = Script(_api_error(status), "never")
    with pytest.raises(KubernetesLaunchError, match="job 'pretrain-abc'") as caught:
        call_api("create", "jobs.batch", "ml", fn, name="pretrain-abc", log=lambda _: None)
    assert fn.calls == 1 and words in str(caught.value) and caught.value.status == status


def test_gives_up_after_the_configured_attempts_as_an_infrastructure_fault():
    fn = Script(*[_api_error(503)] * 3)
    with pytest.raises(KubernetesApiUnavailable, match="failed 3 times; last: HTTP 503"):
        call_api("get", "jobs.batch", "ml", fn, attempts=3, log=lambda _: None)
    assert fn.calls == 3


def test_a_create_whose_answer_was_lost_is_not_created_twice():
    """503 after the server stored the Job: the retry meets 409, which means the first try went through."""
    created = Script(_api_error(503), _api_error(409))
    assert call_api("create", "jobs.batch", "ml", created, log=lambda _: None,
                    on_conflict=lambda: "the existing Job") == "the existing Job"
    # A 409 on the *first* try is a real name clash: reported, not swallowed.
    with pytest.raises(KubernetesLaunchError):
        call_api("create", "jobs.batch", "ml", Script(_api_error(409)), log=lambda _: None, on_conflict=lambda: "x")
