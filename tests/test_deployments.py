"""prefect.yaml names real flows with parameters they accept, and a valid schedule."""

import importlib
from pathlib import Path

import yaml
from prefect.client.schemas.schedules import CronSchedule

REPO = Path(__file__).resolve().parent.parent


def test_every_deployment_points_at_a_flow_that_takes_its_parameters():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert {d["name"] for d in spec["deployments"]} == {
        "attribute-digits",
        "lds-digits",
        "removal-digits",
        "nightly-curation",
    }
    for deployment in spec["deployments"]:
        path, _, name = deployment["entrypoint"].partition(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, name)
        flow.validate_parameters(deployment["parameters"])
        assert (REPO / deployment["parameters"]["config_path"]).exists()
        for schedule in deployment.get("schedules", []):
            CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
