"""Deployment artifacts: Dockerfile, deploy/ manifests, the systemd unit, and docs/operations.md.

Docker cannot build here, so the Dockerfile is checked statically: its instructions are parsed and
``dockerfile_problems`` lists what would break the drop-in (wrong base, a missing tool, no
``/usr/local/bin/kube-proxy``, a non-root USER). The same goes for the ClusterRole
(``rbac_problems``). Both checkers are also run on plausible mistakes, so a check that silently
stopped checking fails here.

Every Kubernetes manifest is validated against the bundled schemas of ``kubernetes_validate``
(offline, strict: unknown fields are errors). The DaemonSet's and the systemd unit's command lines are
fed to our own flag parser (``kubeproxy.cli.load_config``) against temp copies of the configuration
they ship, so "the upstream command line works unchanged" is tested, not assumed.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import trustme
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
SYSTEMD = DEPLOY / "systemd"
DOCS = REPO / "docs"

BINARY = "/usr/local/bin/kube-proxy"
UPSTREAM_COMMAND = [BINARY, "--config=/var/lib/kube-proxy/config.conf", "--hostname-override=$(NODE_NAME)"]
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
NODE_NAME = "worker-1"
DATA_PATH_PACKAGES = {"nftables", "iptables", "conntrack", "ipset", "iproute2"}


# ---- helpers -----------------------------------------------------------------------------------


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in manifest_files() for doc in yaml_docs(path)]


def the(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in manifests() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected exactly one {kind} {name or ''} in deploy/, found {len(found)}"
    return found[0]


def container(ds: Mapping[str, Any]) -> dict[str, Any]:
    containers = ds["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["kube-proxy"]
    return dict(containers[0])


def expand_k8s_vars(arg: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion in command/args: ``$$`` escapes, unknown names stay literal."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, arg)


def container_env(c: Mapping[str, Any], field_values: Mapping[str, str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = expand_k8s_vars(var["value"], env)
        elif "fieldRef" in var.get("valueFrom", {}):
            env[var["name"]] = field_values[var["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


@dataclass
class Credentials:
    """A service-account directory (CA + token) and a client certificate, as files."""

    sa_dir: Path
    ca_file: Path
    token_file: Path
    cert_file: Path
    key_file: Path


@pytest.fixture
def creds(tmp_path: Path) -> Credentials:
    ca = trustme.CA()
    sa_dir = tmp_path / "serviceaccount"
    sa_dir.mkdir()
    ca.cert_pem.write_to_path(str(sa_dir / "ca.crt"))
    (sa_dir / "token").write_text("test-token\n")
    leaf = ca.issue_cert("kube-proxy.example", common_name="system:kube-proxy")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "client.crt"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    return Credentials(sa_dir, sa_dir / "ca.crt", sa_dir / "token", tmp_path / "client.crt", tmp_path / "client.key")


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"expected {old!r} exactly once"
    return text.replace(old, new)


# ---- Dockerfile (static) -----------------------------------------------------------------------


@dataclass
class Instruction:
    op: str
    args: str
    line: int


@dataclass
class Stage:
    base: str  # FROM image, variables resolved
    name: str
    instructions: list[Instruction]


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comment lines (also inside continuations) dropped."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        joined = " ".join(buf)
        buf = []
        op, _, args = joined.partition(" ")
        out.append(Instruction(op.upper(), args.strip(), start))
    assert not buf, "Dockerfile ends inside a line continuation"
    return out


def _subst(value: str, variables: Mapping[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), ""), value)


def dockerfile_stages(text: str) -> list[Stage]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in parse_dockerfile(text):
        if ins.op == "ARG" and not stages:
            name, _, default = ins.args.partition("=")
            global_args[name.strip()] = default.strip().strip('"')
        elif ins.op == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            base = _subst(words[0], global_args)
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(base, name, []))
        elif stages:
            stages[-1].instructions.append(ins)
    return stages


def shell_commands(run_args: str) -> list[list[str]]:
    """A RUN's shell form split into simple commands (on &&, ||, ;) and words."""
    lexer = shlex.shlex(run_args, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for word in lexer:
        if word in (";", "&&", "||", "&", "|"):
            commands.append([])
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


PYTHON_311_SLIM = re.compile(r"^(docker\.io/(library/)?)?python:3\.11(\.\d+)?-slim-bookworm(@sha256:[0-9a-f]{64})?$")


def dockerfile_problems(text: str) -> list[str]:
    problems: list[str] = []
    stages = dockerfile_stages(text)
    if not stages:
        return ["no FROM"]
    names = {s.name for s in stages if s.name}
    for s in stages:
        if s.base not in names and not PYTHON_311_SLIM.match(s.base):
            problems.append(f"base {s.base!r} is not python:3.11-slim-bookworm")
    final = stages[-1]
    runs = [i for i in final.instructions if i.op == "RUN"]

    # Data-path tools, installed in the final image by one clean apt-get layer.
    apt_runs = [r for r in runs if any(c[:2] == ["apt-get", "install"] for c in shell_commands(r.args))]
    installed: set[str] = set()
    for r in apt_runs:
        cmds = shell_commands(r.args)
        install = next(c for c in cmds if c[:2] == ["apt-get", "install"])
        installed |= {w for w in install[2:] if not w.startswith("-")}
        if "--no-install-recommends" not in install:
            problems.append(f"line {r.line}: apt-get install without --no-install-recommends")
        before = cmds[: cmds.index(install)]
        after = cmds[cmds.index(install) + 1 :]
        if not any(c[:2] == ["apt-get", "update"] for c in before):
            problems.append(f"line {r.line}: apt-get install without apt-get update in the same RUN")
        if not any(c[:2] == ["rm", "-rf"] and "/var/lib/apt/lists/*" in c for c in after):
            problems.append(f"line {r.line}: apt lists not removed (rm -rf /var/lib/apt/lists/*) in the same RUN")
    missing = DATA_PATH_PACKAGES - installed
    if missing:
        problems.append(f"final image lacks packages: {sorted(missing)}")

    # The project, from a wheel built in an earlier stage, into the system interpreter (/usr/local).
    sources = {m[1] for i in final.instructions if i.op == "COPY" and (m := re.search(r"--from=(\S+)", i.args))}
    if not sources & names:
        problems.append("final stage copies nothing from a build stage")
    ran = [c for r in runs for c in shell_commands(r.args)]
    pip_installs = [c for c in ran if c[:2] == ["pip", "install"] or c[:4] == ["python", "-m", "pip", "install"]]
    if not any(any(w.endswith(".whl") for w in c) for c in pip_installs):
        problems.append("final stage does not pip install a wheel")
    for c in pip_installs:
        bad = {"--user", "--prefix", "--target", "--root", "-t"} & {w.split("=")[0] for w in c}
        if bad:
            problems.append(f"pip install {sorted(bad)} puts the console script outside /usr/local/bin")
    if any(c[:3] == ["python", "-m", "venv"] or c[:2] == ["uv", "venv"] for c in ran):
        problems.append("final stage creates a virtualenv: kube-proxy would not be /usr/local/bin/kube-proxy")
    if not any(c[:1] == [BINARY] or (c[:2] == ["test", "-x"] and BINARY in c) for c in ran):
        problems.append(f"the build never runs {BINARY} (a missing console script would go unnoticed)")

    # Lockfile: the dependency set comes from uv.lock, not from a fresh resolve.
    build = [i for s in stages[:-1] for i in s.instructions]
    lock_copied = any(i.op == "COPY" and "uv.lock" in i.args.split() for i in build)
    uv_cmds = [c for i in build if i.op == "RUN" for c in shell_commands(i.args) if c[:1] == ["uv"]]
    from_lock = any(c[1:2] in (["export"], ["sync"]) and {"--frozen", "--locked"} & set(c) for c in uv_cmds)
    if not (lock_copied and from_lock):
        problems.append("dependencies are not taken from uv.lock (COPY uv.lock + uv export/sync --frozen/--locked)")

    # Root: kube-proxy needs CAP_NET_ADMIN & co; a non-root USER drops them.
    for i in final.instructions:
        if i.op == "USER" and i.args.split(":")[0] not in ("root", "0"):
            problems.append(f"line {i.line}: USER {i.args} drops the capabilities kube-proxy needs")
    for i in final.instructions:
        if i.op == "ENTRYPOINT":
            try:
                form = json.loads(i.args)
            except ValueError:
                form = None
            if not isinstance(form, list) or form[:1] != [BINARY]:
                problems.append(f"line {i.line}: ENTRYPOINT should be exec form [{BINARY!r}]")
    return problems


def test_dockerfile_has_no_problems() -> None:
    assert dockerfile_problems((REPO / "Dockerfile").read_text()) == []


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("python:3.11-slim-bookworm", "python:3.12-slim-bookworm", "is not python:3.11-slim-bookworm"),
        ("python:3.11-slim-bookworm", "python:3.11-bookworm", "is not python:3.11-slim-bookworm"),
        ("python:3.11-slim-bookworm", "python:3.11-slim-bullseye", "is not python:3.11-slim-bookworm"),
        (" conntrack ipset", " ipset", "lacks packages: ['conntrack']"),
        ("nftables iptables", "iptables", "lacks packages: ['nftables']"),
        (" --no-install-recommends", "", "without --no-install-recommends"),
        (" && rm -rf /var/lib/apt/lists/*", "", "apt lists not removed"),
        (
            'ENTRYPOINT ["/usr/local/bin/kube-proxy"]',
            'ENTRYPOINT ["/usr/local/bin/kube-proxy"]\nUSER 65532',
            "USER 65532",
        ),
        ('ENTRYPOINT ["/usr/local/bin/kube-proxy"]', "USER nobody", "USER nobody"),
        ("pip install --no-index", "pip install --user --no-index", "outside /usr/local/bin"),
        ('ENTRYPOINT ["/usr/local/bin/kube-proxy"]', 'ENTRYPOINT ["python", "-m", "kubeproxy"]', "ENTRYPOINT"),
        ("uv export --frozen", "uv export", "uv.lock"),
        ("COPY --from=build /wheels", "COPY ./wheels", "copies nothing from a build stage"),
        (
            " && test -x /usr/local/bin/kube-proxy \\\n && /usr/local/bin/kube-proxy --version",
            "",
            "never runs /usr/local/bin/kube-proxy",
        ),
        ("COPY pyproject.toml uv.lock README.md", "COPY pyproject.toml README.md", "uv.lock"),
    ],
)
def test_dockerfile_checker_catches(old: str, new: str, problem: str) -> None:
    text = replace_once((REPO / "Dockerfile").read_text(), old, new)
    found = dockerfile_problems(text)
    assert any(problem in p for p in found), found


def test_dockerfile_checker_catches_tools_installed_only_in_the_build_stage() -> None:
    text = (REPO / "Dockerfile").read_text()
    build, final = text.split("\nFROM ${PYTHON_IMAGE}\n")
    apt = next(line for line in final.splitlines() if "apt-get install" in line)
    final = replace_once(final, apt, " && true \\")
    build += "\nRUN apt-get update" + apt.removesuffix("\\") + "&& rm -rf /var/lib/apt/lists/*\n"
    found = dockerfile_problems(build + "\nFROM ${PYTHON_IMAGE}\n" + final)
    assert any("lacks packages" in p for p in found), found


def test_dockerfile_copies_only_files_the_build_context_keeps() -> None:
    """Every COPY source exists and is not excluded by .dockerignore (hatchling needs README.md)."""
    ignored = [
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and line[0] != "#"
    ]
    assert {".git", ".venv"} <= set(ignored)
    sources: list[str] = []
    for stage in dockerfile_stages((REPO / "Dockerfile").read_text()):
        for i in stage.instructions:
            if i.op == "COPY" and "--from=" not in i.args:
                sources += i.args.split()[:-1]
    assert {"pyproject.toml", "uv.lock", "README.md", "src"} <= set(sources)
    for src in sources:
        assert (REPO / src).exists(), src
        hit = [pat for pat in ignored if not pat.startswith("!") and Path(src).match(pat.removeprefix("**/"))]
        assert not hit, f"{src} is excluded from the build context by .dockerignore {hit}"


def test_console_script_is_kube_proxy() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["kube-proxy"] == "kubeproxy.cli:main"


# ---- Kubernetes manifests ----------------------------------------------------------------------


def _manifest_id(item: tuple[Path, dict[str, Any]]) -> str:
    path, doc = item
    return f"{path.name}:{doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.parametrize("item", manifests(), ids=_manifest_id)
def test_manifest_matches_kubernetes_schema(item: tuple[Path, dict[str, Any]]) -> None:
    _, doc = item
    version = kubernetes_validate.latest_version()
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{_manifest_id(item)} is not a valid {version} object: {exc}")


def test_schema_validation_is_strict() -> None:
    ds = copy.deepcopy(the("DaemonSet"))
    ds["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, kubernetes_validate.latest_version(), strict=True)


def test_all_objects_as_kubeadm_names_them() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in manifests()}
    assert {
        ("ServiceAccount", "kube-proxy"),
        ("ConfigMap", "kube-proxy"),
        ("DaemonSet", "kube-proxy"),
        ("ClusterRole", "kubeproxy-py:node-proxier"),
        ("ClusterRoleBinding", "kubeproxy-py:node-proxier"),
    } == kinds
    for _, d in manifests():
        if d["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert d["metadata"]["namespace"] == "kube-system", d["kind"]


def test_kustomization_lists_every_manifest_and_the_image() -> None:
    k = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert k["namespace"] == "kube-system"
    assert sorted(k["resources"]) == sorted(p.name for p in manifest_files())
    image = container(the("DaemonSet"))["image"]
    repo, _, tag = image.rpartition(":")
    assert {"name": repo, "newName": repo, "newTag": tag} in k["images"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (kustomize build is optional)")
def test_kustomize_build_renders_every_object() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in built) == sorted(
        (d["kind"], d["metadata"]["name"]) for _, d in manifests()
    )


# ---- RBAC: least privilege ---------------------------------------------------------------------

EXPECTED_RULES: dict[tuple[str, str], set[str]] = {
    ("", "services"): {"list", "watch"},
    ("discovery.k8s.io", "endpointslices"): {"list", "watch"},
    ("", "nodes"): {"list", "watch"},
    ("", "events"): {"create", "patch", "update"},
    ("events.k8s.io", "events"): {"create", "patch", "update"},
}


def rbac_problems(role: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    granted: dict[tuple[str, str], set[str]] = {}
    if role.get("aggregationRule"):
        problems.append("aggregationRule: the role would collect other roles' rules")
    for n, rule in enumerate(role.get("rules") or []):
        for key in ("apiGroups", "resources", "verbs"):
            if "*" in rule.get(key, []):
                problems.append(f"rule {n}: wildcard in {key}")
        for key in ("nonResourceURLs", "resourceNames"):
            if rule.get(key):
                problems.append(f"rule {n}: unexpected {key}")
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                granted.setdefault((group, resource), set()).update(rule.get("verbs", []))
    for key in sorted(granted.keys() | EXPECTED_RULES.keys()):
        extra = granted.get(key, set()) - EXPECTED_RULES.get(key, set())
        lacking = EXPECTED_RULES.get(key, set()) - granted.get(key, set())
        if extra:
            problems.append(f"{key[0] or 'core'}/{key[1]}: extra verbs {sorted(extra)}")
        if lacking:
            problems.append(f"{key[0] or 'core'}/{key[1]}: missing verbs {sorted(lacking)}")
    return problems


def test_cluster_role_is_least_privilege() -> None:
    assert rbac_problems(the("ClusterRole")) == []


def _mutated_role(edit: str) -> dict[str, Any]:
    role = copy.deepcopy(the("ClusterRole"))
    rules = role["rules"]
    if edit == "get services":
        next(r for r in rules if "services" in r["resources"])["verbs"].append("get")
    elif edit == "secrets":
        rules.append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]})
    elif edit == "wildcard verbs":
        rules[0]["verbs"] = ["*"]
    elif edit == "wildcard groups":
        rules[0]["apiGroups"] = ["*"]
    elif edit == "no events.k8s.io":
        next(r for r in rules if "events" in r["resources"])["apiGroups"] = [""]
    elif edit == "patch nodes":
        next(r for r in rules if "nodes" in r["resources"])["verbs"].append("patch")
    elif edit == "endpoints instead of endpointslices":
        next(r for r in rules if "endpointslices" in r["resources"])["resources"] = ["endpoints"]
    return role


@pytest.mark.parametrize(
    "edit",
    [
        "get services",
        "secrets",
        "wildcard verbs",
        "wildcard groups",
        "no events.k8s.io",
        "patch nodes",
        "endpoints instead of endpointslices",
    ],
)
def test_rbac_checker_catches(edit: str) -> None:
    assert rbac_problems(_mutated_role(edit)), edit


def test_binding_gives_the_role_to_the_daemonset_service_account() -> None:
    binding = the("ClusterRoleBinding")
    role = the("ClusterRole")
    sa = the("ServiceAccount")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": sa["metadata"]["namespace"]}
    ]
    assert the("DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


# ---- DaemonSet -----------------------------------------------------------------------------------


def test_daemonset_pod_spec_as_kubeadm() -> None:
    ds = the("DaemonSet")
    assert ds["metadata"]["labels"]["k8s-app"] == "kube-proxy"
    assert ds["spec"]["selector"]["matchLabels"] == {"k8s-app": "kube-proxy"}
    assert ds["spec"]["template"]["metadata"]["labels"]["k8s-app"] == "kube-proxy"
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["serviceAccountName"] == "kube-proxy"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    # Runs on every node whatever its taints: a toleration with operator Exists and no key or effect.
    assert {"operator": "Exists"} in pod["tolerations"]


def test_daemonset_container_runs_the_upstream_command_privileged() -> None:
    c = container(the("DaemonSet"))
    assert c["command"] == UPSTREAM_COMMAND
    assert "args" not in c
    assert c["securityContext"]["privileged"] is True
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in c["env"]


def test_daemonset_mounts() -> None:
    ds = the("DaemonSet")
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in container(ds)["volumeMounts"]}
    config = volumes[mounts["/var/lib/kube-proxy"]["name"]]
    assert config["configMap"]["name"] == the("ConfigMap")["metadata"]["name"]
    lock = volumes[mounts["/run/xtables.lock"]["name"]]
    assert lock["hostPath"] == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    assert not mounts["/run/xtables.lock"].get("readOnly", False)
    modules = volumes[mounts["/lib/modules"]["name"]]
    assert modules["hostPath"]["path"] == "/lib/modules"
    assert mounts["/lib/modules"]["readOnly"] is True


def test_daemonset_config_paths_are_configmap_keys() -> None:
    """--config and the config's kubeconfig both point into the ConfigMap mount, at existing keys."""
    cm = the("ConfigMap")
    keys = set(cm["data"])
    assert keys == {"config.conf", "kubeconfig.conf"}
    config_arg = next(a for a in container(the("DaemonSet"))["command"] if a.startswith("--config="))
    config_path = Path(config_arg.removeprefix("--config="))
    assert config_path.parent == Path("/var/lib/kube-proxy") and config_path.name in keys
    kubeconfig = Path(yaml.safe_load(cm["data"]["config.conf"])["clientConnection"]["kubeconfig"])
    assert kubeconfig.parent == Path("/var/lib/kube-proxy") and kubeconfig.name in keys


def test_daemonset_probes_on_the_health_server() -> None:
    c = container(the("DaemonSet"))
    live, ready = c["livenessProbe"], c["readinessProbe"]
    assert live["httpGet"]["path"] == "/livez" and live["httpGet"]["port"] == 10256
    assert ready["httpGet"]["path"] == "/healthz" and ready["httpGet"]["port"] == 10256
    for probe in (live, ready):
        assert probe["httpGet"].get("scheme", "HTTP") == "HTTP"
        assert "host" not in probe["httpGet"]  # the node IP (hostNetwork): reachable on 0.0.0.0:10256
        assert 1 <= probe["timeoutSeconds"] < probe["periodSeconds"] <= 30
    # /livez turns 503 only after 2 x syncPeriod of stalled updates; do not restart on one slow answer.
    assert live["periodSeconds"] * live["failureThreshold"] >= 30
    # The probes can reach the health server: the config keeps it on all addresses, port 10256.
    healthz = yaml.safe_load(the("ConfigMap")["data"]["config.conf"])["healthzBindAddress"]
    assert healthz in ("", "0.0.0.0:10256")


# ---- ConfigMap -----------------------------------------------------------------------------------


def test_configmap_config_is_kubeadm_layout_in_nftables_mode() -> None:
    conf = yaml.safe_load(the("ConfigMap")["data"]["config.conf"])
    assert conf["kind"] == "KubeProxyConfiguration"
    assert conf["apiVersion"] == "kubeproxy.config.k8s.io/v1alpha1"
    assert conf["mode"] == "nftables"
    for cidr in conf["clusterCIDR"].split(","):
        ipaddress.ip_network(cidr)
    assert conf["clientConnection"]["kubeconfig"] == "/var/lib/kube-proxy/kubeconfig.conf"
    # kubeadm's zero values: "use the default" for every mode-specific section.
    assert conf["configSyncPeriod"] == "0s"
    assert conf["iptables"]["masqueradeBit"] is None
    assert conf["nftables"] == {
        "masqueradeAll": False,
        "masqueradeBit": None,
        "minSyncPeriod": "0s",
        "syncPeriod": "0s",
    }
    assert conf["logging"] == {
        "flushFrequency": 0,
        "options": {"json": {"infoBufferSize": "0"}, "text": {"infoBufferSize": "0"}},
        "verbosity": 0,
    }
    kubeadm_keys = {
        "bindAddress", "bindAddressHardFail", "clientConnection", "clusterCIDR", "configSyncPeriod", "conntrack",
        "detectLocal", "detectLocalMode", "enableProfiling", "healthzBindAddress", "hostnameOverride", "iptables",
        "ipvs", "logging", "metricsBindAddress", "mode", "nftables", "nodePortAddresses", "oomScoreAdj", "portRange",
        "showHiddenMetricsForVersion", "winkernel",
    }  # fmt: skip
    assert kubeadm_keys <= set(conf)


def test_configmap_kubeconfig_is_the_in_cluster_service_account(tmp_path: Path, creds: Credentials) -> None:
    from kubeproxy.sources.kubeconfig import load_kubeconfig

    text = the("ConfigMap")["data"]["kubeconfig.conf"]
    doc = yaml.safe_load(text)
    assert doc["kind"] == "Config" and doc["current-context"] == "default"
    cluster = doc["clusters"][0]["cluster"]
    assert re.fullmatch(r"https://[^/:]+:6443", cluster["server"])
    assert cluster["certificate-authority"] == f"{SA_DIR}/ca.crt"
    assert doc["users"][0]["user"] == {"tokenFile": f"{SA_DIR}/token"}
    # Our loader accepts it (with the service-account files in a temp dir).
    path = tmp_path / "kubeconfig.conf"
    path.write_text(text.replace(SA_DIR, str(creds.sa_dir)))
    settings = load_kubeconfig(path)
    assert settings.server == cluster["server"]
    assert settings.ca_file == str(creds.ca_file)
    assert settings.credentials.authorization() == "Bearer test-token"


# ---- the DaemonSet's command line through our flag parser ----------------------------------------


def materialize_configmap(tmp: Path, creds: Credentials, *, edit: tuple[str, str] | None = None) -> Path:
    """The ConfigMap's keys as files in a temp dir standing for /var/lib/kube-proxy."""
    mount = tmp / "var-lib-kube-proxy"
    mount.mkdir()
    data = the("ConfigMap")["data"]
    conf = replace_once(data["config.conf"], "/var/lib/kube-proxy/kubeconfig.conf", str(mount / "kubeconfig.conf"))
    if edit:
        conf = replace_once(conf, *edit)
    (mount / "config.conf").write_text(conf)
    (mount / "kubeconfig.conf").write_text(data["kubeconfig.conf"].replace(SA_DIR, str(creds.sa_dir)))
    return mount


def daemonset_argv(mount: Path) -> list[str]:
    c = container(the("DaemonSet"))
    env = container_env(c, {"spec.nodeName": NODE_NAME})
    argv = [expand_k8s_vars(a, env) for a in c["command"]]
    assert argv[0] == BINARY
    return [a.replace("/var/lib/kube-proxy", str(mount)) for a in argv[1:]]


def test_daemonset_command_line_is_accepted_by_our_parser(tmp_path: Path, creds: Credentials) -> None:
    from kubeproxy.cli import load_config

    mount = materialize_configmap(tmp_path, creds)
    argv = daemonset_argv(mount)
    assert f"--hostname-override={NODE_NAME}" in argv
    cfg = load_config(argv)
    conf = yaml.safe_load(the("ConfigMap")["data"]["config.conf"])
    assert cfg.mode.value == "nftables"
    assert cfg.hostname_override == NODE_NAME
    assert cfg.healthz_bind_address == "0.0.0.0:10256"
    assert cfg.metrics_bind_address == "127.0.0.1:10249"
    assert cfg.sync_period == 30.0
    assert tuple(cfg.cluster_cidrs) == tuple(str(ipaddress.ip_network(c)) for c in conf["clusterCIDR"].split(","))
    assert str(cfg.kubeconfig) == str(mount / "kubeconfig.conf")


def test_our_parser_reads_the_configmap_file(tmp_path: Path, creds: Credentials) -> None:
    """The file is really read: a bad mode in it is a ConfigError, not silently the default."""
    from kubeproxy.cli import load_config
    from kubeproxy.config import ConfigError

    mount = materialize_configmap(tmp_path, creds, edit=("mode: nftables", "mode: bogus"))
    with pytest.raises(ConfigError):
        load_config(daemonset_argv(mount))


# ---- systemd unit ----------------------------------------------------------------------------------


def unit_sections(text: str) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def unit_values(sections: Mapping[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    """Values of a key; list-valued keys accumulate, an empty assignment resets (systemd semantics)."""
    out: list[str] = []
    for k, v in sections.get(section, []):
        if k == key:
            out = [*out, *v.split()] if v else []
    return out


UNIT = SYSTEMD / "kube-proxy.service"


def test_systemd_unit_settings() -> None:
    s = unit_sections(UNIT.read_text())
    assert "network-online.target" in unit_values(s, "Unit", "After")
    assert "network-online.target" in unit_values(s, "Unit", "Wants")
    assert unit_values(s, "Service", "Restart") == ["always"]
    assert int(unit_values(s, "Service", "RestartSec")[0].rstrip("s")) > 0
    assert int(unit_values(s, "Service", "LimitNOFILE")[0]) >= 65536
    assert unit_values(s, "Service", "User") in ([], ["root"])
    bounding = set(unit_values(s, "Service", "CapabilityBoundingSet"))
    assert {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_ADMIN"} <= bounding or not bounding
    assert "multi-user.target" in unit_values(s, "Install", "WantedBy")
    exec_start = shlex.split(unit_values_raw(s, "ExecStart"))
    assert exec_start[0] == BINARY
    assert "--config=/etc/kubernetes/kube-proxy/config.conf" in exec_start


def unit_values_raw(sections: Mapping[str, list[tuple[str, str]]], key: str) -> str:
    values = [v for k, v in sections["Service"] if k == key and v]
    assert len(values) == 1, f"expected one {key}"
    return values[0].lstrip("-@+!:")


def systemd_argv(tmp: Path, creds: Credentials) -> list[str]:
    """ExecStart's arguments with %-specifiers and unset $VARS expanded as systemd would, and the
    /etc/kubernetes/kube-proxy files replaced by temp copies of deploy/systemd's samples."""
    etc = tmp / "etc-kube-proxy"
    etc.mkdir()
    conf = replace_once(
        (SYSTEMD / "config.conf").read_text(),
        "/etc/kubernetes/kube-proxy/kubeconfig.conf",
        str(etc / "kubeconfig.conf"),
    )
    (etc / "config.conf").write_text(conf)
    kubeconfig = (SYSTEMD / "kubeconfig.conf").read_text()
    kubeconfig = replace_once(kubeconfig, "/etc/kubernetes/pki/ca.crt", str(creds.ca_file))
    kubeconfig = replace_once(kubeconfig, "/etc/kubernetes/kube-proxy/kube-proxy.crt", str(creds.cert_file))
    kubeconfig = replace_once(kubeconfig, "/etc/kubernetes/kube-proxy/kube-proxy.key", str(creds.key_file))
    (etc / "kubeconfig.conf").write_text(kubeconfig)

    words = shlex.split(unit_values_raw(unit_sections(UNIT.read_text()), "ExecStart"))
    argv: list[str] = []
    for word in words[1:]:
        if re.fullmatch(r"\$\w+|\$\{\w+\}", word):  # unquoted, unset: expands to no argument at all
            continue
        word = word.replace("%H", NODE_NAME).replace("%%", "%")
        argv.append(word.replace("/etc/kubernetes/kube-proxy", str(etc)))
    return argv


def test_systemd_command_line_is_accepted_by_our_parser(tmp_path: Path, creds: Credentials) -> None:
    from kubeproxy.cli import load_config
    from kubeproxy.sources.kubeconfig import load_kubeconfig

    argv = systemd_argv(tmp_path, creds)
    cfg = load_config(argv)
    conf = yaml.safe_load((SYSTEMD / "config.conf").read_text())
    assert conf["kind"] == "KubeProxyConfiguration"
    assert cfg.mode.value == "nftables"
    assert cfg.hostname_override == NODE_NAME
    assert cfg.healthz_bind_address == "0.0.0.0:10256"
    assert cfg.metrics_bind_address == "127.0.0.1:10249"
    assert cfg.sync_period == 30.0
    assert tuple(cfg.cluster_cidrs) == tuple(str(ipaddress.ip_network(c)) for c in conf["clusterCIDR"].split(","))
    settings = load_kubeconfig(Path(cfg.kubeconfig))
    assert settings.credentials.describe == "client certificate"


def test_systemd_sample_config_matches_the_configmap() -> None:
    """One configuration, two homes: only the kubeconfig path differs."""
    cm = yaml.safe_load(the("ConfigMap")["data"]["config.conf"])
    sample = yaml.safe_load((SYSTEMD / "config.conf").read_text())
    assert sample["clientConnection"].pop("kubeconfig") == "/etc/kubernetes/kube-proxy/kubeconfig.conf"
    cm["clientConnection"].pop("kubeconfig")
    assert sample == cm


def _systemd_verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )


def _unit_messages(result: subprocess.CompletedProcess[str], unit: Path) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if unit.name in line or str(unit) in line]


@pytest.fixture
def systemd_analyze(tmp_path: Path) -> Iterator[None]:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    probe = tmp_path / "probe" / "probe.service"
    probe.parent.mkdir()
    probe.write_text("[Service]\nExecStart=/bin/true\n")
    result = _systemd_verify(probe)
    if result.returncode != 0:
        pytest.skip(f"systemd-analyze verify cannot run here: {result.stderr.strip()[:300]}")
    yield


def _verifiable_unit(tmp_path: Path, text: str) -> Path:
    # ExecStart must name an existing executable: our console script from this venv.
    script = Path(sys.executable).parent / "kube-proxy"
    assert script.exists(), script
    unit = tmp_path / "unit" / "kube-proxy.service"
    unit.parent.mkdir()
    unit.write_text(replace_once(text, f"ExecStart={BINARY} ", f"ExecStart={script} "))
    return unit


@pytest.mark.usefixtures("systemd_analyze")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = _verifiable_unit(tmp_path, UNIT.read_text())
    result = _systemd_verify(unit)
    assert result.returncode == 0, result.stderr
    assert _unit_messages(result, unit) == []


@pytest.mark.usefixtures("systemd_analyze")
def test_systemd_analyze_verify_reports_a_broken_unit(tmp_path: Path) -> None:
    unit = _verifiable_unit(tmp_path, replace_once(UNIT.read_text(), "Restart=always", "Restrat=always"))
    assert _unit_messages(_systemd_verify(unit), unit)


# ---- docs -------------------------------------------------------------------------------------------


def test_operations_doc_chain_names_are_ours() -> None:
    """Per-service chain names quoted in docs/operations.md are what names.py derives."""
    from kubeproxy.backends.nftables import names

    text = (DOCS / "operations.md").read_text()
    chain = r"\b(service|external|local|firewall)-([A-Z2-7]{8})-([a-z0-9-]+/[a-z0-9-]+/(?:tcp|udp|sctp)/[a-z0-9-]*)"
    quoted = re.findall(chain, text)
    assert quoted, "docs/operations.md quotes no per-service chain name"
    for prefix, digest, tail in quoted:
        assert names.hash_and_truncate(tail) == f"{digest}-{tail}", f"{prefix}-{digest}-{tail}"
        assert prefix in names.SERVICE_CHAIN_PREFIXES


def github_anchor(heading: str) -> str:
    """GitHub's heading slug: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_docs_links_resolve() -> None:
    """Relative links in docs/*.md point at files that exist, and #anchors at headings of the page."""
    for doc in DOCS.glob("*.md"):
        text = doc.read_text()
        anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            if path:
                assert (doc.parent / path).exists(), f"{doc.name}: broken link {target}"
            elif anchor:
                assert anchor in anchors, f"{doc.name}: no heading for #{anchor}"
