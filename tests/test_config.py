"""Configuration: the KubeProxyConfiguration file (strict v1alpha1), upstream's flags in Go syntax,
their precedence, --write-config-to, --help/--version, --init-only and the "not supported yet" report.

The kubeadm file in tests/data is what ``kubectl -n kube-system get cm kube-proxy`` shows on a kubeadm
cluster (config.conf), zero values and all.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kubeproxy import cli, configfile, daemon
from kubeproxy.cli import load_config, main
from kubeproxy.config import ConfigError, ConntrackConfig, DetectLocalMode, ProxyConfig, ProxyMode
from kubeproxy.configfile import format_duration, parse_duration
from kubeproxy.kernel.sysctl import CONNTRACK_MAX, HASHSIZE, FakeSysctl

KUBEADM = Path(__file__).parent / "data" / "kubeadm-kube-proxy-config.conf"
HEAD = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"


def write(tmp_path: Path, body: str, name: str = "config.conf") -> Path:
    path = tmp_path / name
    path.write_text(HEAD + body)
    return path


# -- the file ------------------------------------------------------------------------------------------


def test_a_kubeadm_config_map_loads_unchanged_with_upstream_defaults() -> None:
    cfg = load_config([f"--config={KUBEADM}"])
    assert cfg.mode is ProxyMode.NFTABLES  # mode "": our default (upstream's is iptables)
    assert cfg.kubeconfig == "/var/lib/kube-proxy/kubeconfig.conf"
    assert cfg.cluster_cidrs == ("10.244.0.0/16",)
    assert cfg.detect_local_mode is DetectLocalMode.CLUSTER_CIDR
    assert (cfg.sync_period, cfg.min_sync_period, cfg.masquerade_bit, cfg.masquerade_all) == (30.0, 1.0, 14, False)
    assert cfg.healthz_bind_address == "0.0.0.0:10256" and cfg.metrics_bind_address == "127.0.0.1:10249"
    assert cfg.conntrack == ConntrackConfig()  # maxPerCore 32768, min 131072, 24h, 1h, ...
    assert cfg.oom_score_adj == -999 and cfg.nodeport_addresses == () and dict(cfg.feature_gates) == {}
    assert cfg.configz["nftables"]["syncPeriod"] == "30s"
    assert cfg.configz["healthzBindAddress"] == "0.0.0.0:10256"


def test_explicit_values_are_kept_and_mode_sections_apply(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "mode: nftables\nnftables: {syncPeriod: 1m30s, minSyncPeriod: 250ms, masqueradeBit: 0, masqueradeAll: true}\n"
        "iptables: {syncPeriod: 5s}\n"  # another mode's section: not used in nftables mode
        "conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, udpTimeout: 30s}\n"
        "healthzBindAddress: 127.0.0.1\nmetricsBindAddress: '[::1]:9999'\n"
        "detectLocalMode: InterfaceNamePrefix\ndetectLocal: {interfaceNamePrefix: veth}\n"
        "nodePortAddresses: [primary, 192.168.50.0/24]\nfeatureGates: {SomeGate: true}\noomScoreAdj: 0\n",
    )
    cfg = load_config([f"--config={path}"])
    assert (cfg.sync_period, cfg.min_sync_period, cfg.masquerade_bit, cfg.masquerade_all) == (90.0, 0.25, 0, True)
    assert cfg.conntrack.max_per_core == 0 and cfg.conntrack.tcp_timeout_established is None
    assert cfg.conntrack.udp_timeout == 30.0
    assert cfg.healthz_bind_address == "127.0.0.1:10256"  # upstream appends the default port
    assert cfg.metrics_bind_address == "[::1]:9999"
    assert cfg.detect_local_mode is DetectLocalMode.INTERFACE_NAME_PREFIX and cfg.pod_interface_name_prefix == "veth"
    assert cfg.nodeport_addresses == ("primary", "192.168.50.0/24")
    assert dict(cfg.feature_gates) == {"SomeGate": True} and cfg.oom_score_adj == 0


def test_json_is_yaml_too(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(
        '{"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",'
        ' "clusterCIDR": "10.244.0.0/16,fd00:10:244::/64", "mode": "nftables", "nftables": {"syncPeriod": "10s"}}'
    )
    cfg = load_config([f"--config={path}"])
    assert cfg.cluster_cidrs == ("10.244.0.0/16", "fd00:10:244::/64") and cfg.sync_period == 10.0


def test_an_unset_mode_takes_the_iptables_section_as_upstream_does(tmp_path: Path) -> None:
    # mode "" is upstream's iptables mode; we run nftables then, with what the file says for it.
    path = write(tmp_path, "iptables: {masqueradeAll: true, minSyncPeriod: 10s}\nnftables: {syncPeriod: 5s}\n")
    cfg = load_config([f"--config={path}"])
    assert cfg.mode is ProxyMode.NFTABLES and cfg.masquerade_all
    assert (cfg.min_sync_period, cfg.sync_period) == (10.0, 30.0)


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ("foo: 1\n", ["foo", "unknown field"]),
        ("nftables:\n  syncperiod: 1s\n", ["nftables.syncperiod", "unknown field"]),
        ("cluster_cidr: 10.0.0.0/8\n", ["cluster_cidr", "unknown field"]),  # Python names are not aliases
        ("nftables: {syncPeriod: 30x}\n", ["nftables.syncPeriod", "'30x'"]),
        ("nftables: {syncPeriod: 30}\n", ["nftables.syncPeriod", "30"]),  # a duration is a string
        ("conntrack: {maxPerCore: '5'}\n", ["conntrack.maxPerCore", "'5'"]),
        ("masqueradeAll: true\n", ["masqueradeAll", "unknown field"]),  # lives under iptables/nftables
        ("iptables: {masqueradeAll: 'yes'}\n", ["iptables.masqueradeAll", "'yes'"]),
        ("clientConnection: {burst: 1.5}\n", ["clientConnection.burst", "1.5"]),
        ("mode: a\nmode: b\n", ["duplicate field 'mode'", "line 4"]),
        ("mode: userspace\n", ["mode", "'userspace'"]),
        ("mode: ipvs\n", ["mode", "ipvs", "not implemented yet"]),
        ("mode: nftables\nnftables: {masqueradeBit: 32}\n", ["nftables.masqueradeBit", "32"]),
        ("mode: nftables\nnftables: {syncPeriod: -1s}\n", ["nftables.syncPeriod", "-1s"]),
        ("iptables: {minSyncPeriod: -2s}\n", ["iptables.minSyncPeriod", "-2s"]),  # mode "": iptables section
        ("oomScoreAdj: 1001\n", ["oomScoreAdj", "1001"]),
        ("conntrack: {min: -1}\n", ["conntrack.min", "-1"]),
        ("healthzBindAddress: 'localhost:10256'\n", ["healthzBindAddress", "localhost:10256"]),
        ("metricsBindAddress: '::1:10249'\n", ["metricsBindAddress", "brackets"]),
        ("metricsBindAddress: '[127.0.0.1]:10249'\n", ["metricsBindAddress", "brackets"]),  # the server would refuse it
        ("healthzBindAddress: ':10256'\n", ["healthzBindAddress", "no IP"]),
        ("bindAddress: nowhere\n", ["bindAddress", "nowhere"]),
        ("clusterCIDR: 10.0.0.0/33\n", ["clusterCIDR", "10.0.0.0/33"]),
        ("nodePortAddresses: [everywhere]\n", ["nodePortAddresses", "everywhere"]),
        ("detectLocalMode: Magic\n", ["detectLocalMode", "Magic"]),
        ("detectLocalMode: BridgeInterface\ndetectLocal: {bridgeInterface: 'br0\"; drop'}\n", ["bridgeInterface"]),
        ("featureGates: {A: maybe}\n", ["featureGates.A", "'maybe'"]),
    ],
)
def test_bad_files_are_errors_naming_the_field_and_the_value(tmp_path: Path, body: str, names: list[str]) -> None:
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        load_config([f"--config={path}"])
    message = str(err.value)
    assert str(path) in message or "mode" in message
    for name in names:
        assert name in message, message


@pytest.mark.parametrize(
    "text",
    [
        "kind: KubeProxyConfiguration\n",  # no apiVersion
        "apiVersion: kubeproxy.config.k8s.io/v1alpha2\nkind: KubeProxyConfiguration\n",
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeletConfiguration\n",
        "- a list\n",
        "{unclosed\n",
    ],
)
def test_not_a_kube_proxy_configuration(tmp_path: Path, text: str) -> None:
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"c\.yaml"):
        load_config([f"--config={tmp_path / 'c.yaml'}"])


def test_a_missing_file_is_an_error() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(["--config=/nonexistent/kube-proxy.conf"])


@pytest.mark.parametrize(
    ("text", "seconds", "canonical"),
    [
        ("30s", 30.0, "30s"),
        ("1m30s", 90.0, "1m30s"),
        ("1m", 60.0, "1m0s"),
        ("24h", 86400.0, "24h0m0s"),
        ("1.5h", 5400.0, "1h30m0s"),
        ("300ms", 0.3, "300ms"),
        ("1500ms", 1.5, "1.5s"),
        ("2h45m0.5s", 9900.5, "2h45m0.5s"),
        ("0", 0.0, "0s"),
        ("0s", 0.0, "0s"),
        ("10us", 1e-5, "10µs"),
        ("-1s", -1.0, "-1s"),
    ],
)
def test_go_durations(text: str, seconds: float, canonical: str) -> None:
    assert parse_duration(text) == pytest.approx(seconds)
    assert format_duration(parse_duration(text)) == canonical


@pytest.mark.parametrize("text", ["", "1", "s", "1d", "1 s", "1s2", "ms"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


# -- flags ---------------------------------------------------------------------------------------------


def test_flag_defaults_are_upstreams() -> None:
    cfg = load_config([])
    assert (cfg.mode, cfg.sync_period, cfg.min_sync_period, cfg.masquerade_bit) == (ProxyMode.NFTABLES, 30, 1, 14)
    assert cfg.healthz_bind_address == "0.0.0.0:10256" and cfg.metrics_bind_address == "127.0.0.1:10249"
    assert cfg.conntrack == ConntrackConfig() and cfg.oom_score_adj == -999 and not cfg.bind_address_hard_fail
    assert cfg.kubeconfig == "" and cfg.manifests is None and not cfg.cleanup and not cfg.init_only


def test_go_style_flag_syntax() -> None:
    cfg = load_config(
        [
            "--v=2",
            "--masquerade-all",
            "--conntrack-tcp-be-liberal=true",
            "--feature-gates=A=true,B=false",
            "--iptables-sync-period=1m30s",
            "--iptables-min-sync-period",
            "0s",
            "--iptables-masquerade-bit=0",
            "--nodeport-addresses=primary,10.0.0.0/8",
            "--cluster-cidr=10.244.0.0/16",
            "--conntrack-max-per-core=0",
            "--bind-address-hard-fail",
            "--hostname-override=node1",
        ]
    )
    assert cfg.verbosity == 2 and cfg.masquerade_all and cfg.conntrack.tcp_be_liberal
    assert dict(cfg.feature_gates) == {"A": True, "B": False}
    assert (cfg.sync_period, cfg.min_sync_period, cfg.masquerade_bit) == (90.0, 0.0, 0)
    assert cfg.nodeport_addresses == ("primary", "10.0.0.0/8") and cfg.cluster_cidrs == ("10.244.0.0/16",)
    assert cfg.conntrack.max_per_core == 0 and cfg.bind_address_hard_fail and cfg.node_name == "node1"
    assert load_config(["-v", "4"]).verbosity == 4
    assert load_config(["-v=3"]).verbosity == 3
    assert not load_config(["--masquerade-all=false"]).masquerade_all
    assert not load_config(["--masquerade-all=f"]).masquerade_all


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["--healthz-bind-address="], ("", "127.0.0.1:10249")),  # empty disables (flags only)
        (["--metrics-bind-address="], ("0.0.0.0:10256", "")),
        (["--metrics-bind-address=0.0.0.0:10249"], ("0.0.0.0:10256", "0.0.0.0:10249")),
        (["--healthz-bind-address=[::]:10256"], ("[::]:10256", "127.0.0.1:10249")),
        (["--healthz-port=0"], ("", "127.0.0.1:10249")),  # deprecated port flags: 0 disables
        (["--metrics-port=19249"], ("0.0.0.0:10256", "127.0.0.1:10249")),  # only fills in a missing port
        (["--metrics-bind-address=127.0.0.1", "--metrics-port=19249"], ("0.0.0.0:10256", "127.0.0.1:19249")),
        (["--healthz-bind-address=0.0.0.0"], ("0.0.0.0:10256", "127.0.0.1:10249")),  # a bare IP: default port
        (["--healthz-bind-address=::"], ("[::]:10256", "127.0.0.1:10249")),
    ],
)
def test_server_address_flags(argv: list[str], expect: tuple[str, str]) -> None:
    cfg = load_config(argv)
    assert (cfg.healthz_bind_address, cfg.metrics_bind_address) == expect


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--masquerade-all=perhaps"], "perhaps"),
        (["--iptables-sync-period=30"], "30"),
        (["--feature-gates=A"], "A"),
        (["--feature-gates=A=maybe"], "maybe"),
        (["--healthz-bind-address=10256"], "10256"),
        (["--bind-address=not-an-ip"], "not-an-ip"),
        (["--proxy-mode=userspace"], "userspace"),
        (["--proxy-mode=ipvs"], "not implemented yet"),
        (["--iptables-masquerade-bit=40"], "40"),
        (["--no-such-flag"], "--no-such-flag"),
        (["--conntrack-min=-5"], "-5"),
        (["--detect-local-mode=BridgeInterface"], "bridgeInterface"),
        (["--vmodule=x"], "x"),
    ],
)
def test_bad_flags_are_errors_naming_the_value(argv: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        load_config(argv)
    assert needle in str(err.value)


def test_the_file_wins_except_logging_flags_and_hostname_override(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(
        tmp_path, "mode: nftables\nnftables: {syncPeriod: 10s}\nhostnameOverride: from-file\nlogging: {verbosity: 1}\n"
    )
    argv = [f"--config={path}", "--iptables-sync-period=1m", "--masquerade-all", "--kubeconfig=/flag"]
    cfg = load_config([*argv, "--v=5", "--hostname-override=Node-7"])
    assert cfg.sync_period == 10.0 and not cfg.masquerade_all and cfg.kubeconfig == ""
    assert cfg.verbosity == 5 and cfg.hostname_override == "node-7" and cfg.node_name == "node-7"
    assert cfg.configz["logging"]["verbosity"] == 5
    assert "--iptables-sync-period,--kubeconfig,--masquerade-all" in caplog.text
    file_only = load_config([f"--config={path}"])
    assert file_only.verbosity == 1 and file_only.hostname_override == "from-file"
    # An empty override does not override (upstream applies it only when non-empty); spaces are an error.
    assert load_config([f"--config={path}", "--hostname-override="]).hostname_override == "from-file"
    with pytest.raises(ConfigError, match="empty hostname-override"):
        load_config([f"--config={path}", "--hostname-override=  "])


def test_repeated_map_and_list_flags_add_up() -> None:
    cfg = load_config(["--feature-gates=A=true", "--feature-gates=B=false,A=false", "--nodeport-addresses=primary",
                       "--nodeport-addresses=10.0.0.0/8"])  # fmt: skip
    assert dict(cfg.feature_gates) == {"A": False, "B": False}
    assert cfg.nodeport_addresses == ("primary", "10.0.0.0/8")


def test_write_config_to_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--masquerade-all", "--iptables-sync-period=45s", "--cluster-cidr=10.244.0.0/16", "--v=3"]
    out = tmp_path / "written.conf"
    assert main([*argv, f"--write-config-to={out}"]) == 0
    text = out.read_text()
    assert text.startswith(HEAD) and "syncPeriod: 45s" in text
    from_flags, from_file = load_config(argv), load_config([f"--config={out}"])
    assert dataclasses.replace(from_file, config_file=None) == from_flags
    assert from_file.configz == from_flags.configz
    capsys.readouterr()


def test_write_config_to_of_the_kubeadm_file_is_its_defaulted_form(tmp_path: Path) -> None:
    out = tmp_path / "w.conf"
    assert main([f"--config={KUBEADM}", f"--write-config-to={out}"]) == 0
    written = configfile.load(out)
    assert written == configfile.load(KUBEADM).defaulted()
    assert written.nftables.sync_period == 30.0 and written.conntrack.max_per_core == 32768


def test_unsupported_settings_are_reported_once_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path,
        "enableProfiling: true\nfeatureGates: {Foo: true}\nconfigSyncPeriod: 5m\n"
        "logging: {format: json}\nclientConnection: {qps: 50}\nbindAddress: 192.168.50.1\n",
    )
    raw = configfile.load(path)
    reported = configfile.unsupported(raw)
    assert [r.split("=")[0] for r in reported] == [
        "clientConnection.qps",
        "bindAddress",
        "enableProfiling",
        "configSyncPeriod",
        "logging.format",
        "featureGates.Foo",
    ]
    assert configfile.unsupported(configfile.load(KUBEADM)) == []  # zero values are not "set"
    # Through main(), on a path that starts work (--init-only, node sysctls faked).
    node = {CONNTRACK_MAX: "1", HASHSIZE: "1", "net/netfilter/nf_conntrack_tcp_timeout_established": "1",
            "net/netfilter/nf_conntrack_tcp_timeout_close_wait": "1"}  # fmt: skip
    monkeypatch.setattr(daemon, "ProcSysctl", lambda: FakeSysctl(values=dict(node)))
    assert main([f"--config={path}", "--init-only"]) == 0
    err = capsys.readouterr().err
    assert err.count("setting not supported yet, ignored setting=enableProfiling=true") == 1
    assert err.count("featureGates.Foo=true") == 1


def test_help_reads_like_upstreams(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage:\n  kube-proxy [flags]" in out and "\nFlags:\n" in out
    flag_lines = [line.strip() for line in out.splitlines() if line.strip().startswith(("--", "-v, ", "-h, "))]
    names = [line.split()[0 if line.startswith("--") else 1].lstrip("-") for line in flag_lines]
    assert names == sorted(names)
    for flag in cli.FLAGS:
        assert flag.name in names
    assert "--iptables-sync-period duration" in out and "(default 30s)" in out
    assert "-v, --v Level" in out and "--feature-gates mapStringBool" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("Kubernetes v1.37")
    assert main(["--version=raw"]) == 0
    assert "GitVersion" in capsys.readouterr().out


def test_bad_configuration_exits_2_with_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "nftables: {syncPeriod: soon}\n")
    assert main([f"--config={path}"]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err and "nftables.syncPeriod" in err and "soon" in err
    assert main(["--bogus"]) == 2


def test_init_only_applies_conntrack_sysctls_and_reports_failure() -> None:
    values = {CONNTRACK_MAX: "1000", HASHSIZE: "1000000", "net/netfilter/nf_conntrack_tcp_timeout_established": "5",
              "net/netfilter/nf_conntrack_tcp_timeout_close_wait": "60"}  # fmt: skip
    sysctl = FakeSysctl(values=dict(values))
    cfg = load_config(["--init-only", "--conntrack-min=2000000"])
    assert cfg.init_only
    assert daemon.init_only(cfg, sysctl) == 0
    assert sysctl.values[CONNTRACK_MAX] == "2000000"
    assert sysctl.values["net/netfilter/nf_conntrack_tcp_timeout_established"] == "86400"
    refused = FakeSysctl(values=dict(values), read_only={CONNTRACK_MAX: 30})
    assert daemon.init_only(cfg, refused) == 1


def test_a_proxy_config_built_in_code_serves_nothing_unless_asked() -> None:
    # Tests and the lab build ProxyConfig directly; only flags and files bring upstream's addresses.
    assert ProxyConfig().healthz_bind_address == "" and ProxyConfig().metrics_bind_address == ""
