"""The shared services on Kubernetes: MLflow with a Postgres backend, and a Prefect worker for the Ray cluster.

No secret values are rendered: the database password (or an external database URI) and the Prefect API
address/key live in Secrets that the runbook creates with kubectl; S3 access comes from the service
account's IAM role (IRSA).
"""

from __future__ import annotations

from pipeline.cluster.entrypoint import APP_DIR, MLFLOW_PORT, mlflow_tracking_uri
from pipeline.cluster.kuberay import labels
from pipeline.cluster.spec import ClusterSpec

POSTGRES_IMAGE = "postgres:16"
DB_SECRET = "mlflow-db"  # keys: password (in-cluster Postgres) or uri (external database)
PREFECT_SECRET = "prefect-api"  # keys: url, and key for Prefect Cloud
DASHBOARD_PORT = 8265


def ray_dashboard_address(spec: ClusterSpec) -> str:
    """Ray Jobs address of the RayCluster: KubeRay names the head's service ``<cluster>-head-svc``."""
    return f"http://{spec.name}-head-svc.{spec.namespace}.svc.cluster.local:{DASHBOARD_PORT}"


def _meta(spec: ClusterSpec, name: str, component: str) -> dict:
    return {"name": name, "namespace": spec.namespace, "labels": labels(spec, component)}


def namespace(spec: ClusterSpec) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": spec.namespace}}


def service_account(spec: ClusterSpec) -> dict:
    meta = _meta(spec, spec.service_account, "service-account")
    if spec.irsa_role_arn:
        meta["annotations"] = {"eks.amazonaws.com/role-arn": spec.irsa_role_arn}
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta}


def postgres(spec: ClusterSpec) -> list[dict]:
    sel = labels(spec, "mlflow-postgres")
    svc = {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(spec, "mlflow-postgres", "mlflow-postgres"),
        "spec": {"selector": sel, "ports": [{"name": "postgres", "port": 5432, "targetPort": 5432}]},
    }
    sts = {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta(spec, "mlflow-postgres", "mlflow-postgres"),
        "spec": {
            "serviceName": "mlflow-postgres",
            "replicas": 1,
            "selector": {"matchLabels": sel},
            "template": {
                "metadata": {"labels": sel},
                "spec": {"containers": [{
                    "name": "postgres",
                    "image": POSTGRES_IMAGE,
                    "ports": [{"containerPort": 5432, "name": "postgres"}],
                    "env": [
                        {"name": "POSTGRES_USER", "value": "mlflow"},
                        {"name": "POSTGRES_DB", "value": "mlflow"},
                        {"name": "POSTGRES_PASSWORD",
                         "valueFrom": {"secretKeyRef": {"name": DB_SECRET, "key": "password"}}},
                        {"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"},
                    ],
                    "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
                    "readinessProbe": {"exec": {"command": ["pg_isready", "-U", "mlflow"]}, "periodSeconds": 10},
                    "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"}],
                }]},
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "50Gi"}}},
            }],
        },
    }
    return [svc, sts]


def mlflow_server_args(spec: ClusterSpec) -> list[str]:
    """`mlflow server` arguments; $(VAR) is expanded by Kubernetes from the container's env."""
    store = ("postgresql://mlflow:$(MLFLOW_DB_PASSWORD)@mlflow-postgres:5432/mlflow"
             if spec.mlflow_db == "postgres" else "$(MLFLOW_DB_URI)")
    svc = f"mlflow.{spec.namespace}"
    hosts = ["mlflow", svc, f"{svc}.svc", f"{svc}.svc.cluster.local", "localhost"]
    allowed = ",".join([*(h for host in hosts for h in (host, f"{host}:{MLFLOW_PORT}")),
                        # Pod addresses (the kubelet's readiness probe, port-forwards): listing hosts replaces
                        # MLflow's default of private addresses, so name them again.
                        "10.*", "172.*", "192.168.*"])
    return [
        "server",
        "--backend-store-uri", store,
        "--artifacts-destination", spec.mlflow_artifacts_uri,
        "--host", "0.0.0.0",
        "--port", str(MLFLOW_PORT),
        # Clients reach it by its service name; MLflow's DNS-rebinding guard admits only listed hosts.
        "--allowed-hosts", allowed,
    ]


def mlflow(spec: ClusterSpec) -> list[dict]:
    sel = labels(spec, "mlflow")
    if spec.mlflow_db == "postgres":
        env = [{"name": "MLFLOW_DB_PASSWORD",
                "valueFrom": {"secretKeyRef": {"name": DB_SECRET, "key": "password"}}}]
    else:
        env = [{"name": "MLFLOW_DB_URI", "valueFrom": {"secretKeyRef": {"name": DB_SECRET, "key": "uri"}}}]
    env.append({"name": "AWS_DEFAULT_REGION", "value": spec.region})
    dep = _deployment(spec, "mlflow", {
        "name": "mlflow",
        "image": spec.image,
        "command": ["mlflow"],
        "args": mlflow_server_args(spec),
        "env": env,
        "ports": [{"containerPort": MLFLOW_PORT, "name": "http"}],
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
        "readinessProbe": {"httpGet": {"path": "/health", "port": MLFLOW_PORT}, "periodSeconds": 10},
    })
    svc = {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(spec, "mlflow", "mlflow"),
        "spec": {"selector": sel, "ports": [{"name": "http", "port": MLFLOW_PORT, "targetPort": MLFLOW_PORT}]},
    }
    return [dep, svc]


def prefect_worker_command(spec: ClusterSpec) -> list[str]:
    # A process worker: flow runs execute in this pod and hand training to the Ray cluster via Ray Jobs.
    return ["prefect", "worker", "start", "--pool", spec.prefect_pool, "--type", "process"]


def prefect_worker(spec: ClusterSpec) -> dict:
    return _deployment(spec, "prefect-worker", {
        "name": "prefect-worker",
        "image": spec.image,
        "workingDir": APP_DIR,
        "command": prefect_worker_command(spec),
        "env": [
            {"name": "PREFECT_API_URL",
             "valueFrom": {"secretKeyRef": {"name": PREFECT_SECRET, "key": "url"}}},
            {"name": "PREFECT_API_KEY",
             "valueFrom": {"secretKeyRef": {"name": PREFECT_SECRET, "key": "key", "optional": True}}},
            {"name": "RAY_ADDRESS", "value": ray_dashboard_address(spec)},
            {"name": "MLFLOW_TRACKING_URI", "value": mlflow_tracking_uri(spec)},
            {"name": "AWS_DEFAULT_REGION", "value": spec.region},
        ],
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
    })


def _deployment(spec: ClusterSpec, component: str, container: dict) -> dict:
    """A one-replica Deployment of ``container`` under the spec's service account (the shape both services share)."""
    sel = labels(spec, component)
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(spec, component, component),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": sel},
            "template": {
                "metadata": {"labels": sel},
                "spec": {"serviceAccountName": spec.service_account, "containers": [container]},
            },
        },
    }


def render_services(spec: ClusterSpec) -> list[dict]:
    docs = [namespace(spec), service_account(spec)]
    if spec.mlflow_db == "postgres":
        docs += postgres(spec)
    docs += mlflow(spec)
    docs.append(prefect_worker(spec))
    return docs
