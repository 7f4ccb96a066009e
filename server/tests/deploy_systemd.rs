//! `deploy/systemd/` checked with `systemd-analyze verify` and `systemd-analyze security`,
//! and against the real binaries: the relay accepts the configuration the unit names, the probe
//! runs a round with the unit's arguments, the sysctls match the relay's settings.
//!
//! Tools, installed by `.ci/run`: `systemd-analyze` and `systemd-sysusers` (Debian `systemd`).
//! A missing tool fails the test with the package to install.

mod deploy;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use deploy::common;
use deploy::*;

#[test]
fn systemd_units_verify() {
    let dir = TempDir::new("systemd-verify");
    let relay = common::relay_binary();
    let probe = probe_binary();
    for (unit, binary, real) in [
        ("turnpike.service", &relay, "/usr/local/bin/turnpike "),
        (
            "turnpike-probe.service",
            &probe,
            "/usr/local/bin/turnpike-probe ",
        ),
    ] {
        let text = std::fs::read_to_string(systemd_dir().join(unit)).expect("unit");
        let line = text
            .lines()
            .find(|l| l.starts_with("ExecStart="))
            .expect("ExecStart");
        assert!(line.starts_with(&format!("ExecStart={real}")), "{line}");
        // verify insists that the binary exists: point it at the one just built.
        let text = text.replace(
            &format!("ExecStart={real}"),
            &format!("ExecStart={} ", binary.display()),
        );
        std::fs::write(dir.path().join(unit), text).expect("write unit");
    }
    // The TLS drop-in, installed where systemd looks for it.
    let dropins = dir.path().join("turnpike.service.d");
    std::fs::create_dir(&dropins).expect("mkdir");
    std::fs::copy(
        systemd_dir().join("turnpike-tls.conf"),
        dropins.join("tls.conf"),
    )
    .expect("copy drop-in");

    let out = run(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(dir.path().join("turnpike.service"))
            .arg(dir.path().join("turnpike-probe.service"))
            .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display())),
        INSTALL_SYSTEMD,
    );
    let text = output_text(&out);
    assert!(out.status.success(), "systemd-analyze verify:\n{text}");
    // Unknown keys and unparsable values are only warnings ("ignoring"): refuse them too.
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("turnpike") || l.contains(&*dir.path().to_string_lossy()))
        .collect();
    assert!(ours.is_empty(), "systemd-analyze verify:\n{text}");

    let root = TempDir::new("sysusers");
    std::fs::create_dir(root.path().join("etc")).expect("mkdir");
    let out = run(
        Command::new("systemd-sysusers")
            .arg(format!("--root={}", root.path().display()))
            .arg(systemd_dir().join("turnpike.sysusers")),
        INSTALL_SYSTEMD,
    );
    assert!(
        out.status.success(),
        "systemd-sysusers: {}",
        output_text(&out)
    );
    // The groups the units add are the ones the sysusers file creates.
    let groups = std::fs::read_to_string(root.path().join("etc/group")).expect("group");
    for file in ["turnpike-tls.conf", "turnpike-probe.service"] {
        let settings = unit_settings(&systemd_dir().join(file));
        let group = &settings["SupplementaryGroups"][0];
        assert!(
            groups.lines().any(|l| l.starts_with(&format!("{group}:"))),
            "{file}: group {group} not in\n{groups}"
        );
    }
}

#[test]
fn systemd_units_are_hardened() {
    for unit in ["turnpike.service", "turnpike-probe.service"] {
        let out = run(
            Command::new("systemd-analyze")
                .args(["security", "--offline=true", "--no-pager"])
                .arg(format!("--threshold={}", (MAX_EXPOSURE * 10.0) as u32))
                .arg(systemd_dir().join(unit)),
            INSTALL_SYSTEMD,
        );
        let text = output_text(&out);
        let exposure: f64 = text
            .lines()
            .find_map(|l| {
                l.split_once("Overall exposure level for ")?
                    .1
                    .split_once(": ")
            })
            .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
        eprintln!("{unit}: exposure {exposure}");
        assert!(
            exposure <= MAX_EXPOSURE && out.status.success(),
            "{unit}: exposure {exposure} > {MAX_EXPOSURE}:\n{text}"
        );
    }

    // The relay unit: 443 with one capability, a drain that fits, the configuration it names.
    let unit = unit_settings(&systemd_dir().join("turnpike.service"));
    let one = |k: &str| -> &str {
        unit.get(k)
            .and_then(|v| v.last())
            .map(String::as_str)
            .unwrap_or_else(|| panic!("turnpike.service has no {k}="))
    };
    assert_eq!(one("AmbientCapabilities"), "CAP_NET_BIND_SERVICE");
    assert_eq!(one("CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE");
    // The score tolerates losing any one of these; the relay should lose none.
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("LockPersonality", "yes"),
        ("RestrictNamespaces", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("SystemCallArchitectures", "native"),
        // The one writable place: the default state folder (and SQLite store) of
        // config/turnpike.example.toml, private to the relay.
        ("StateDirectory", "turnpike"),
        ("StateDirectoryMode", "0700"),
    ] {
        assert_eq!(one(key), value, "turnpike.service {key}=");
    }
    let text =
        std::fs::read_to_string(repo().join("config/turnpike.example.toml")).expect("example");
    for default in [
        "# url = \"sqlite:/var/lib/turnpike/store.db\"",
        "# state_dir = \"/var/lib/turnpike\"",
    ] {
        assert!(text.contains(default), "the example names {default}");
    }
    assert!(unit["SystemCallFilter"]
        .iter()
        .any(|f| f == "@system-service"));
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(one("KillSignal"), "SIGTERM");
    assert!(one("LimitNOFILE").parse::<u64>().expect("LimitNOFILE") >= 1 << 20);
    let stop: i64 = one("TimeoutStopSec")
        .parse()
        .expect("TimeoutStopSec in seconds");
    // The unit's documented limit on drain_grace_secs, and the drains the repository ships.
    assert!(stop > 300, "TimeoutStopSec {stop}");
    let example = example_config();
    let drain = example["drain_grace_secs"].as_integer().expect("drain");
    let k8s: toml::Table = s(
        object("ConfigMap", "turnpike-config"),
        &["data", "turnpike.toml"],
    )
    .parse()
    .expect("TOML");
    for d in [drain, k8s["drain_grace_secs"].as_integer().expect("drain")] {
        assert!(
            d <= 300 && stop > d,
            "drain_grace_secs {d}, TimeoutStopSec {stop}"
        );
    }
    let exec = one("ExecStart");
    let args: Vec<&str> = exec.split_whitespace().skip(1).collect();
    assert_eq!(args, ["--config", "/etc/turnpike/turnpike.toml"]);
    // --check-config loads the certificates the example names: give it real ones.
    let cert = common::TestCert::new("systemd-tls", &["relay.example.org"]);
    let example_copy = cert.dir.join("turnpike.toml");
    let text =
        std::fs::read_to_string(repo().join("config/turnpike.example.toml")).expect("example");
    let text = text
        .replace(
            "/etc/turnpike/tls/fullchain.pem",
            &cert.cert.display().to_string(),
        )
        .replace(
            "/etc/turnpike/tls/privkey.pem",
            &cert.key.display().to_string(),
        );
    std::fs::write(&example_copy, text).expect("example copy");
    let out = run(
        Command::new(common::relay_binary())
            .arg("--config")
            .arg(&example_copy)
            .arg("--check-config"),
        "turnpike",
    );
    assert!(out.status.success(), "{}", output_text(&out));

    // The probe unit: its command line, with the regions file systemd hands it, runs a round.
    let probe = unit_settings(&systemd_dir().join("turnpike-probe.service"));
    let exec = probe["ExecStart"].last().expect("ExecStart");
    let mut words = exec.split_whitespace().map(str::to_owned);
    assert_eq!(
        words.next().as_deref(),
        Some("/usr/local/bin/turnpike-probe")
    );
    let args: Vec<String> = words.collect();
    let path = flag(&args, "--regions").expect("--regions");
    assert_eq!(path, "/etc/turnpike-probe/regions.toml");
    let dir = TempDir::new("probe-unit");
    let regions = dir.path().join("regions.toml");
    let example = object("Secret", "turnpike-probe-regions");
    std::fs::write(&regions, s(example, &["stringData", "regions.toml"])).expect("write");
    run_probe_round(&args, &regions);
}

#[test]
fn sysctls_match_the_relay_configuration() {
    let text = std::fs::read_to_string(systemd_dir().join("90-turnpike.conf")).expect("sysctl");
    let mut sysctl = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line.split_once('=').expect("KEY = VALUE");
        let k = k.trim();
        assert!(
            Path::new("/proc/sys").join(k.replace('.', "/")).exists(),
            "no such sysctl: {k}"
        );
        sysctl.insert(k.to_owned(), v.trim().to_owned());
    }
    let k8s: toml::Table = s(
        object("ConfigMap", "turnpike-config"),
        &["data", "turnpike.toml"],
    )
    .parse()
    .expect("TOML");
    for config in [example_config(), k8s] {
        let ports = config["relay_ports"].as_str().expect("relay_ports");
        assert_eq!(sysctl["net.ipv4.ip_local_reserved_ports"], ports);
        let buffer = config["socket_buffer_bytes"].as_integer().expect("buffer");
        for k in ["net.core.rmem_max", "net.core.wmem_max"] {
            assert!(sysctl[k].parse::<i64>().expect(k) >= buffer, "{k}");
        }
    }
}
