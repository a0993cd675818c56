"""API-server rules the stand-in enforces, with the real server's field paths and wording
(pkg/apis/core/validation, pkg/apis/batch/validation), plus one HTTP round trip each way."""
from __future__ import annotations

import copy
import json
import urllib.error
import urllib.request

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from pipeline.launch.k8s_manifests import render_job, render_service

from pipeline.launch.k8s_settings import KubernetesLaunchConfig
from tests.k8s_standin import k8s_standin  # noqa: F401  (pytest fixture)
from tests.k8s_standin.server import api_rules
from tests.k8s_standin.store import ApiError, label_selector

CFG = KubernetesLaunchConfig(namespace="ml", gpus_per_node=4)
JOB = render_job(CFG, "pretrain-run-abc123", "pretrain", [], "run")
CONTAINER = "spec.template.spec.containers[0]"


def _job(edit) -> dict:
    job = copy.deepcopy(JOB)
    edit(job)
    return job


def test_the_launchers_manifests_pass():
    assert api_rules(JOB) == []
    assert api_rules(render_service(CFG, "pretrain-run-abc123", "pretrain", "run")) == []


def _gpu(requests: dict, limits: dict):
    def edit(job):
        job["spec"]["template"]["spec"]["containers"][0]["resources"] = {"requests": requests, "limits": limits}
    return edit


@pytest.mark.parametrize("edit, expected", [
    (_gpu({"nvidia.com/gpu": "4"}, {"nvidia.com/gpu": "8"}),
     (f"{CONTAINER}.resources.requests", 'Invalid value: "4": must be equal to nvidia.com/gpu limit of 8')),
    (_gpu({"nvidia.com/gpu": "4"}, {}),
     (f"{CONTAINER}.resources.limits", "Required value: Limit must be set for non overcommitable resources")),
    (_gpu({}, {"nvidia.com/gpu": "0.5"}),
     (f"{CONTAINER}.resources.limits[nvidia.com/gpu]", 'Invalid value: "0.5": must be an integer')),
    (lambda job: job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"].update(values=[0, 2]),
     ("spec.podFailurePolicy.rules[0].onExitCodes.values[0]", "Invalid value: 0: must not be 0 for the In operator")),
    (lambda job: job["spec"]["podFailurePolicy"]["rules"][1].update(action="FailIndex"),
     ("spec.podFailurePolicy.rules[1].action",
      'Invalid value: "FailIndex": requires the backoffLimitPerIndex to be set')),
    (lambda job: job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"].update(containerName="other"),
     ("spec.podFailurePolicy.rules[0].onExitCodes.containerName",
      'Invalid value: "other": must be one of the container or initContainer names in the pod template')),
    (lambda job: job["spec"]["template"]["spec"].update(restartPolicy="OnFailure"),
     ("spec.template.spec.restartPolicy",
      'Invalid value: "OnFailure": only "Never" is supported when podFailurePolicy is specified')),
    (lambda job: job["spec"]["template"]["spec"].pop("restartPolicy"),
     ("spec.template.spec.restartPolicy", 'Required value: valid values: "OnFailure", "Never"')),
    (lambda job: job["spec"].pop("completions"),
     ("spec.completions", "Required value: when completion mode is Indexed")),
    (lambda job: job["metadata"].update(name="x" * 62),
     ("metadata.name",
      f'Invalid value: "{"x" * 62}": will not able to create pod with invalid DNS label: {"x" * 62}-0')),
    (lambda job: job["metadata"]["labels"].update(stage="has space"),
     ("metadata.labels", 'Invalid value: "has space": a valid label must be an empty string or consist of alphanumeric '
      "characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or "
      "'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')")),
])
def test_job_rules(edit, expected):
    assert expected in api_rules(_job(edit))


def test_service_names_are_dns1035_labels():
    svc = render_service(CFG, "1st-stage", "pretrain", "run")
    assert api_rules(svc) == [("metadata.name", 'Invalid value: "1st-stage": a DNS-1035 label must consist of '
                               "lower case alphanumeric characters or '-', start with an alphabetic character, and "
                               "end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for "
                               "validation is '[a-z]([-a-z0-9]*[a-z0-9])?')")]
    # A Job may be named so (DNS-1123 subdomain rules), only its Service may not.
    assert not [p for p in api_rules(render_job(CFG, "1st-stage", "pretrain", [], "run")) if p[0] == "metadata.name"]


def test_label_selectors_with_sets():
    labels = {"app": "a", "tier": "web"}
    assert label_selector("app in (a, b),tier notin (db)")(labels)
    assert not label_selector("app notin (a)")(labels)
    assert label_selector("!missing,app,tier!=db")(labels) and not label_selector("!app")(labels)
    with pytest.raises(ApiError):
        label_selector("app in a")


def test_invalid_over_http_is_422_naming_each_field(k8s_standin):  # noqa: F811
    job = _job(lambda j: (_gpu({"nvidia.com/gpu": "4"}, {"nvidia.com/gpu": "8"})(j),
                          j["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"].update(values=[0, 2])))
    request = urllib.request.Request(f"{k8s_standin.host}/apis/batch/v1/namespaces/ml/jobs", method="POST",
                                     data=json.dumps(job).encode(), headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    status = json.loads(caught.value.read())
    assert (caught.value.code, status["reason"], status["details"]["kind"]) == (422, "Invalid", "Job")
    assert status["message"].startswith('Job.batch "pretrain-run-abc123" is invalid: [spec.podFailurePolicy')
    assert [c["field"] for c in status["details"]["causes"]] == [
        "spec.podFailurePolicy.rules[0].onExitCodes.values[0]", f"{CONTAINER}.resources.requests"]
    assert k8s_standin.jobs() == []


def test_invalid_service_name_through_the_official_client(k8s_standin):  # noqa: F811
    core = k8s.CoreV1Api(k8s_standin.api_client())
    with pytest.raises(ApiException) as caught:
        core.create_namespaced_service("ml", render_service(CFG, "0-stage", "pretrain", "run"))
    assert caught.value.status == 422
    assert json.loads(caught.value.body)["details"]["causes"][0]["field"] == "metadata.name"


@pytest.mark.parametrize("body, content_type, code, text", [
    (b'{"apiVersion": "batch/v1", "kind": "Job", "metadata": {', "application/json", 400, "json parse error"),
    (b"kind: Job\nmetadata: {name: y\n", "application/yaml", 400, "couldn't get version/kind"),
    (b"\x00\x01", "application/octet-stream", 415, "unknown format"),
    (json.dumps({**JOB, "spec": {**JOB["spec"], "completions": "two"}}).encode(), "application/json", 400,
     "cannot unmarshal string into Go struct field Job.spec.completions of type int32"),
    (json.dumps({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"}}).encode(), "application/json",
     422, "spec.template.spec.containers: Required value"),
    (json.dumps(_job(lambda j: j["spec"]["template"]["spec"]["containers"][0].pop("name"))).encode(),
     "application/json", 422, f"{CONTAINER}.name: Required value"),
])
def test_bodies_the_server_cannot_take_answer_a_status(k8s_standin, body, content_type, code, text):  # noqa: F811
    request = urllib.request.Request(f"{k8s_standin.host}/apis/batch/v1/namespaces/ml/jobs", method="POST", data=body,
                                     headers={"Content-Type": content_type})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    status = json.loads(caught.value.read())
    assert (caught.value.code, status["kind"], status["code"]) == (code, "Status", code)
    assert text in status["message"]


def test_chunked_yaml_body_is_read(k8s_standin):  # noqa: F811
    import http.client

    import yaml
    svc = render_service(KubernetesLaunchConfig(namespace="ml"), "chunked", "pretrain", "run")
    data = yaml.safe_dump(svc).encode()
    conn = http.client.HTTPConnection(k8s_standin.host.removeprefix("http://"), timeout=30)
    conn.request("POST", "/api/v1/namespaces/ml/services", body=iter([data[:10], data[10:]]),
                 headers={"Content-Type": "application/yaml"}, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 201, response.read()
    assert json.loads(response.read())["spec"]["clusterIP"] == "None"
