//! The deployment files: `deploy/kubernetes/` validated offline with `kubernetes-validate
//! --strict`, `deploy/systemd/` with `systemd-analyze verify` and `systemd-analyze security`,
//! and both checked against the real binaries: the configuration the pod renders parses with the
//! relay's own parser, the ports and probes are the ones the relay serves, the drain fits in the
//! grace period, the probe exporter runs a round with the manifest's arguments.
//!
//! Tools, installed by `.ci/run`: `python3` with PyYAML and `kubernetes-validate` (PyPI
//! `kubernetes-validate`, which brings PyYAML), `systemd-analyze` and `systemd-sysusers` (Debian
//! `systemd`). A missing tool fails the test with the package to install.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use toml::Value;

/// Kubernetes versions the manifests are validated against: the oldest they need (the preStop
/// `sleep` action is on by default from 1.30) and a recent one.
const K8S_VERSIONS: [&str; 2] = ["1.30.0", "1.33.0"];
/// Highest `systemd-analyze security` exposure accepted (systemd 252 rates the relay 1.4 and the
/// probe 1.1, both "OK").
const MAX_EXPOSURE: f64 = 2.5;

const INSTALL_PY: &str =
    "PyPI kubernetes-validate, which brings PyYAML: python3 -m pip install 'kubernetes-validate==1.37.0'";
const INSTALL_SYSTEMD: &str =
    "Debian systemd (systemd-analyze, systemd-sysusers): apt-get install systemd";

// ---------------------------------------------------------------------------------------------
// Kubernetes

#[test]
fn kubernetes_manifests_pass_strict_validation() {
    let files = applied_manifests();
    assert!(files.len() >= 10, "manifests found: {files:?}");
    let paths: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    let documents: usize = files.iter().map(|p| docs(p).len()).sum();
    for version in K8S_VERSIONS {
        let mut args = vec!["--strict", "--kubernetes-version", version];
        args.extend(paths.iter().map(String::as_str));
        let out = run(Command::new("kubernetes-validate").args(&args), INSTALL_PY);
        let text = output_text(&out);
        assert!(
            out.status.success(),
            "kubernetes-validate {version}:\n{text}"
        );
        // An unknown kind is only a warning: it would pass without being checked.
        assert!(
            !text.contains("WARN"),
            "kubernetes-validate {version}:\n{text}"
        );
        assert_eq!(
            text.matches(" passed for resource ").count(),
            documents,
            "every document validated against {version}:\n{text}"
        );
    }

    // The validator really rejects what the API server would: an unknown field.
    let dir = TempDir::new("k8s-negative");
    let original = std::fs::read_to_string(kube_dir().join("relay/deployment.yaml")).expect("read");
    let broken = original.replacen(
        "      hostNetwork: true\n",
        "      hostNetwork: true\n      hostNetworking: true\n",
        1,
    );
    assert_ne!(broken, original);
    let path = dir.path().join("deployment.yaml");
    std::fs::write(&path, broken).expect("write");
    let out = run(
        Command::new("kubernetes-validate")
            .args(["--strict", "--kubernetes-version", K8S_VERSIONS[0]])
            .arg(&path),
        INSTALL_PY,
    );
    assert!(
        !out.status.success(),
        "an unknown field must fail strict validation:\n{}",
        output_text(&out)
    );
}

#[test]
fn kustomizations_apply_every_manifest_but_the_examples() {
    for dir in ["relay", "probe"] {
        let kustomization = kube_dir().join(dir).join("kustomization.yaml");
        let listed: BTreeSet<String> = arr(&docs(&kustomization)[0], &["resources"])
            .iter()
            .map(|v| str_of(v).to_owned())
            .collect();
        let on_disk: BTreeSet<String> = yaml_files(&kube_dir().join(dir))
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .filter(|n| n != "kustomization.yaml" && !n.ends_with(".example.yaml"))
            .collect();
        assert_eq!(listed, on_disk, "{}", kustomization.display());
        // Every object of a directory lives in that directory's namespace.
        let namespace = if dir == "relay" {
            "turnpike"
        } else {
            "turnpike-probe"
        };
        for file in yaml_files(&kube_dir().join(dir)) {
            for doc in docs(&file) {
                let kind = s(doc, &["kind"]);
                match kind {
                    "Kustomization" => {}
                    "Namespace" => assert_eq!(s(doc, &["metadata", "name"]), namespace),
                    _ => assert_eq!(
                        s(doc, &["metadata", "namespace"]),
                        namespace,
                        "{kind} in {}",
                        file.display()
                    ),
                }
            }
        }
    }
}

/// Runs the render-config init container's script as the pod would, then the relay with the
/// container's arguments on what it rendered, and checks what the relay makes of it.
#[test]
fn relay_pod_renders_a_configuration_the_relay_accepts() {
    let dep = object("Deployment", "turnpike-relay");
    let pod = at(dep, &["spec", "template", "spec"]);
    let init = named(arr(pod, &["initContainers"]), "render-config");
    let relay = named(arr(pod, &["containers"]), "relay");
    let dir = TempDir::new("relay-pod");
    let volumes = materialize_volumes(pod, dir.path());

    // The example ConfigMap of public addresses names the node and its address.
    let public_ips = object("ConfigMap", "turnpike-public-ips");
    let (node, public_ip) = table(public_ips, &["data"])
        .iter()
        .next()
        .map(|(k, v)| (k.clone(), str_of(v).to_owned()))
        .expect("an example node");
    let host_ip = "10.0.0.5";
    let secret = "first-fleet-secret,second-fleet-secret";
    let fields = BTreeMap::from([
        ("spec.nodeName", node.clone()),
        ("status.hostIP", host_ip.to_owned()),
    ]);
    let secrets = BTreeMap::from([(("turnpike-auth", "secrets"), secret.to_owned())]);

    // The relay's shared secret is the key the example Secret defines.
    let example_secret = object("Secret", "turnpike-auth");
    assert!(opt(example_secret, &["stringData", "secrets"]).is_some());

    let render = |fields: &BTreeMap<&str, String>, secrets: &BTreeMap<(&str, &str), String>| {
        assert_eq!(
            strings(at(init, &["command"])),
            ["/bin/sh", "-c"],
            "render-config runs a script"
        );
        let script = str_of(&arr(init, &["args"])[0]).to_owned();
        let env = container_env(init, fields, secrets, &volumes);
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", &script])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .envs(&env);
        run(&mut cmd, "/bin/sh")
    };

    // A node missing from turnpike-public-ips stops with the reason.
    let mut elsewhere = fields.clone();
    elsewhere.insert("spec.nodeName", "a-node-nobody-listed".into());
    let out = render(&elsewhere, &secrets);
    assert!(!out.status.success());
    assert!(
        output_text(&out)
            .contains("turnpike-public-ips has no entry for node a-node-nobody-listed"),
        "{}",
        output_text(&out)
    );
    // So does the example Secret's placeholder.
    let placeholder = BTreeMap::from([(
        ("turnpike-auth", "secrets"),
        s(example_secret, &["stringData", "secrets"]).to_owned(),
    )]);
    let out = render(&fields, &placeholder);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("Secret turnpike-auth"),
        "{}",
        output_text(&out)
    );

    let out = render(&fields, &secrets);
    assert!(out.status.success(), "render-config: {}", output_text(&out));

    // The relay container runs the image's entrypoint itself: a shell in front of it would lose
    // the binary's CAP_NET_BIND_SERVICE (file capability) under no_new_privs.
    assert!(
        opt(relay, &["command"]).is_none(),
        "the relay must be exec'ed directly, not through a command"
    );
    let env = container_env(relay, &fields, &secrets, &volumes);
    let mut args = Vec::new();
    for a in strings(at(relay, &["args"])) {
        let a = expand(&a, &env);
        match a.strip_prefix("--config=") {
            Some(path) => args.push(format!(
                "--config={}",
                host_path(path, relay, &volumes).display()
            )),
            None => args.push(a),
        }
    }
    args.push("--check-config".into());
    // --check-config loads the certificates: put real ones where the TLS Secret is mounted.
    let cert = common::TestCert::new("k8s-tls", &["relay-eu.example.org"]);
    if let Some(config) = args.iter().find_map(|a| a.strip_prefix("--config=")) {
        let text = std::fs::read_to_string(config).expect("rendered config");
        let text = text
            .replace(
                "/etc/turnpike/tls/tls.crt",
                &cert.cert.display().to_string(),
            )
            .replace("/etc/turnpike/tls/tls.key", &cert.key.display().to_string());
        std::fs::write(config, text).expect("rendered config");
    }
    let out = run(
        Command::new(common::relay_binary())
            .args(&args)
            .env_clear()
            .envs(env.iter().filter(|(k, _)| k.starts_with("TURNPIKE_"))),
        "turnpike",
    );
    let shown = output_text(&out);
    assert!(out.status.success(), "turnpike {args:?}:\n{shown}");
    let settings = compact(&shown);

    assert!(
        settings.contains(&format!("external_ips:[({public_ip},Some({host_ip},),),]")),
        "advertises the node's public address for its internal one:\n{shown}"
    );
    assert!(
        settings.contains(&format!("relay_ips:[{host_ip},]")),
        "{shown}"
    );
    assert!(
        settings.contains("secrets:[<redacted>,<redacted>,]"),
        "both secrets from TURNPIKE_AUTH_SECRET:\n{shown}"
    );
    assert!(settings.contains("generated_secret:false"), "{shown}");
    assert!(
        settings.contains("users:[]"),
        "no static users in a fleet:\n{shown}"
    );

    // Health and metrics: the probes and the scrape annotation point where the relay serves.
    let metrics = between(&settings, "metrics_listen:Some(", ",)").expect("metrics_listen");
    assert_eq!(metrics, format!("{host_ip}:9641"));
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        assert_eq!(s(relay, &[probe, "httpGet", "path"]), path, "{probe}");
        assert_eq!(
            port_number(relay, at(relay, &[probe, "httpGet", "port"])),
            9641,
            "{probe}"
        );
    }
    assert_eq!(
        s(
            dep,
            &[
                "spec",
                "template",
                "metadata",
                "annotations",
                "prometheus.io/port"
            ]
        ),
        "9641"
    );
    assert_eq!(
        container_port(relay, "metrics"),
        (9641, "TCP".to_owned()),
        "the metrics port"
    );

    // Every listener is a declared port of the pod (and so of the scheduler's conflict check).
    let listeners = listeners(&settings);
    assert!(listeners.len() >= 4, "{shown}");
    let declared: BTreeSet<(i64, String)> = arr(relay, &["ports"])
        .iter()
        .map(|p| (int(p, &["containerPort"]), s(p, &["protocol"]).to_owned()))
        .collect();
    for (transport, port) in &listeners {
        let protocol = if transport == "Udp" { "UDP" } else { "TCP" };
        assert!(
            declared.contains(&(*port, protocol.to_owned())),
            "listener {transport} {port} is not a declared port: {declared:?}"
        );
    }
    for p in arr(relay, &["ports"]) {
        assert_eq!(int(p, &["hostPort"]), int(p, &["containerPort"]));
    }

    // TLS: the configured files are the kubernetes.io/tls keys of the mounted Secret.
    for (key, file) in [("tls_cert", "tls.crt"), ("tls_key", "tls.key")] {
        let path = between(&settings, &format!("{key}:Some(\""), "\",)").expect(key);
        // The test put real certificates in place of the mounted Secret's files; map back.
        let path = path
            .replace(
                &cert.cert.display().to_string(),
                "/etc/turnpike/tls/tls.crt",
            )
            .replace(&cert.key.display().to_string(), "/etc/turnpike/tls/tls.key");
        let mount = mount_of(relay, "tls");
        assert_eq!(path, format!("{mount}/{file}"), "{key}");
        let volume = named(arr(pod, &["volumes"]), "tls");
        assert_eq!(s(volume, &["secret", "secretName"]), "turnpike-tls");
    }
    // Mounted as directories: a subPath mount would never see a renewed certificate.
    for c in [init, relay] {
        for m in arr(c, &["volumeMounts"]) {
            assert!(opt(m, &["subPath"]).is_none(), "subPath in {m:?}");
        }
    }

    // Draining: SIGTERM comes after the preStop sleep; the relay then serves its calls for
    // drain_grace_secs; the kubelet must not kill it before.
    let drain: i64 = between(&settings, "drain_grace_secs:", ",")
        .and_then(|d| d.parse().ok())
        .expect("drain_grace_secs");
    let pre_stop = int(relay, &["lifecycle", "preStop", "sleep", "seconds"]);
    let grace = int(pod, &["terminationGracePeriodSeconds"]);
    assert!(
        grace > pre_stop + drain,
        "terminationGracePeriodSeconds {grace} <= preStop {pre_stop} + drain_grace_secs {drain}"
    );
    // A rollout waits for each relay to drain.
    assert!(int(dep, &["spec", "progressDeadlineSeconds"]) > grace);
}

#[test]
fn relay_pod_is_one_per_node_unprivileged_and_disrupted_one_at_a_time() {
    let dep = object("Deployment", "turnpike-relay");
    let pod = at(dep, &["spec", "template", "spec"]);
    let labels = table(dep, &["spec", "template", "metadata", "labels"]);
    assert_selects(at(dep, &["spec", "selector"]), labels, "Deployment");

    // Host networking, one relay per node, a new one only where the old one has left.
    assert!(boolean(pod, &["hostNetwork"]));
    assert_eq!(s(pod, &["dnsPolicy"]), "ClusterFirstWithHostNet");
    let anti = &arr(
        pod,
        &[
            "affinity",
            "podAntiAffinity",
            "requiredDuringSchedulingIgnoredDuringExecution",
        ],
    )[0];
    assert_eq!(s(anti, &["topologyKey"]), "kubernetes.io/hostname");
    assert_selects(at(anti, &["labelSelector"]), labels, "anti-affinity");
    assert_eq!(
        int(dep, &["spec", "strategy", "rollingUpdate", "maxSurge"]),
        0
    );

    // Non-root, no escalation, read-only, only NET_BIND_SERVICE, and the service account has no
    // token.
    assert!(boolean(pod, &["securityContext", "runAsNonRoot"]));
    assert_eq!(
        s(pod, &["securityContext", "seccompProfile", "type"]),
        "RuntimeDefault"
    );
    assert!(!boolean(pod, &["automountServiceAccountToken"]));
    for c in arr(pod, &["initContainers"])
        .iter()
        .chain(arr(pod, &["containers"]))
    {
        let name = s(c, &["name"]);
        assert!(
            !boolean(c, &["securityContext", "allowPrivilegeEscalation"]),
            "{name}"
        );
        assert!(
            boolean(c, &["securityContext", "readOnlyRootFilesystem"]),
            "{name}"
        );
        assert_eq!(
            strings(at(c, &["securityContext", "capabilities", "drop"])),
            ["ALL"],
            "{name}"
        );
        assert!(
            opt(c, &["securityContext", "privileged"]).is_none(),
            "{name}"
        );
        assert_eq!(s(c, &["image"]), "ghcr.io/turnpike-relay/turnpike:0.1.0");
    }
    let relay = named(arr(pod, &["containers"]), "relay");
    assert_eq!(
        strings(at(relay, &["securityContext", "capabilities", "add"])),
        ["NET_BIND_SERVICE"]
    );
    let init = named(arr(pod, &["initContainers"]), "render-config");
    assert!(opt(init, &["securityContext", "capabilities", "add"]).is_none());

    // The Secret reaches the relay as an environment variable, never through the ConfigMap.
    let env = named(arr(relay, &["env"]), "TURNPIKE_AUTH_SECRET");
    assert_eq!(
        s(env, &["valueFrom", "secretKeyRef", "name"]),
        "turnpike-auth"
    );
    let config = object("ConfigMap", "turnpike-config");
    let toml_text = s(config, &["data", "turnpike.toml"]);
    let parsed: toml::Table = toml_text.parse().expect("turnpike.toml is TOML");
    assert!(
        parsed.get("auth").and_then(|a| a.get("secrets")).is_none(),
        "no secret in the ConfigMap"
    );
    for key in ["external_ips", "relay_ips", "metrics_listen"] {
        assert!(
            parsed.get(key).is_none(),
            "{key} comes from the pod, not the ConfigMap"
        );
    }

    // One relay of the region at a time may be evicted, and the budget covers exactly the relays.
    let pdb = object("PodDisruptionBudget", "turnpike-relay");
    assert_eq!(int(pdb, &["spec", "maxUnavailable"]), 1);
    assert_selects(
        at(pdb, &["spec", "selector"]),
        labels,
        "PodDisruptionBudget",
    );

    // The headless Service lists the relays by their named ports.
    let svc = object("Service", "turnpike-relay");
    assert_eq!(s(svc, &["spec", "clusterIP"]), "None");
    for (k, v) in table(svc, &["spec", "selector"]) {
        assert_eq!(labels.get(k), Some(v), "Service selector {k}");
    }
    for p in arr(svc, &["spec", "ports"]) {
        let (port, protocol) = container_port(relay, s(p, &["targetPort"]));
        assert_eq!(int(p, &["port"]), port);
        assert_eq!(s(p, &["protocol"]), protocol);
    }
    assert_eq!(
        s(
            svc,
            &[
                "metadata",
                "annotations",
                "external-dns.alpha.kubernetes.io/endpoints-type"
            ]
        ),
        "NodeExternalIP"
    );
}

#[test]
fn probe_exporter_runs_with_its_manifest() {
    let dep = object("Deployment", "turnpike-probe");
    let pod = at(dep, &["spec", "template", "spec"]);
    let probe = named(arr(pod, &["containers"]), "probe");
    let labels = table(dep, &["spec", "template", "metadata", "labels"]);
    assert!(labels.contains_key("turnpike.io/vantage"));

    // Restricted: no capability at all.
    assert!(boolean(pod, &["securityContext", "runAsNonRoot"]));
    assert_eq!(
        s(pod, &["securityContext", "seccompProfile", "type"]),
        "RuntimeDefault"
    );
    assert!(!boolean(
        probe,
        &["securityContext", "allowPrivilegeEscalation"]
    ));
    assert!(boolean(
        probe,
        &["securityContext", "readOnlyRootFilesystem"]
    ));
    assert_eq!(
        strings(at(probe, &["securityContext", "capabilities", "drop"])),
        ["ALL"]
    );
    assert!(opt(probe, &["securityContext", "capabilities", "add"]).is_none());
    let ns = object("Namespace", "turnpike-probe");
    assert_eq!(
        s(
            ns,
            &["metadata", "labels", "pod-security.kubernetes.io/enforce"]
        ),
        "restricted"
    );

    // Its arguments, with the regions file the example Secret holds.
    let command = strings(at(probe, &["command"]));
    assert_eq!(command, ["/usr/local/bin/turnpike-probe"]);
    let args = strings(at(probe, &["args"]));
    assert_eq!(args[0], "watch");
    let dir = TempDir::new("probe-pod");
    let volumes = materialize_volumes(pod, dir.path());
    let listen = flag(&args, "--listen").expect("--listen");
    let port: i64 = listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    assert_eq!(container_port(probe, "metrics").0, port);
    for probe_kind in ["livenessProbe", "readinessProbe"] {
        assert_eq!(s(probe, &[probe_kind, "httpGet", "path"]), "/healthz");
        assert_eq!(
            port_number(probe, at(probe, &[probe_kind, "httpGet", "port"])),
            port
        );
    }
    assert_eq!(
        s(
            dep,
            &[
                "spec",
                "template",
                "metadata",
                "annotations",
                "prometheus.io/port"
            ]
        ),
        port.to_string()
    );
    let regions = host_path(
        &flag(&args, "--regions").expect("--regions"),
        probe,
        &volumes,
    );
    let svc = object("Service", "turnpike-probe");
    for p in arr(svc, &["spec", "ports"]) {
        assert_eq!(
            container_port(probe, s(p, &["targetPort"])).0,
            int(p, &["port"])
        );
    }
    let policy = object("NetworkPolicy", "turnpike-probe");
    assert_eq!(
        s(
            &arr(&arr(policy, &["spec", "ingress"])[0], &["ports"])[0],
            &["port"]
        ),
        "metrics"
    );
    run_probe_round(&args, &regions);
}

#[test]
fn monitoring_and_certificate_objects_match_the_workloads() {
    // CRD kinds (Prometheus Operator, cert-manager): kubernetes-validate has no schema for them,
    // so their references are checked here.
    let file = kube_dir().join("optional/podmonitors.yaml");
    let monitors = docs(&file);
    assert_eq!(monitors.len(), 2);
    for (name, job) in [
        ("turnpike-relay", "turnpike"),
        ("turnpike-probe", "turnpike-probe"),
    ] {
        let monitor = monitors
            .iter()
            .find(|d| s(d, &["metadata", "name"]) == name)
            .expect("PodMonitor");
        assert_eq!(s(monitor, &["kind"]), "PodMonitor");
        assert_eq!(s(monitor, &["apiVersion"]), "monitoring.coreos.com/v1");
        let dep = object("Deployment", name);
        assert_eq!(
            s(monitor, &["metadata", "namespace"]),
            s(dep, &["metadata", "namespace"])
        );
        let labels = table(dep, &["spec", "template", "metadata", "labels"]);
        assert_selects(at(monitor, &["spec", "selector"]), labels, name);
        // The job name the alert rules in deploy/prometheus/ use.
        let job_label = s(monitor, &["spec", "jobLabel"]);
        assert_eq!(labels.get(job_label).map(str_of), Some(job), "{name} job");
        let container = &arr(dep, &["spec", "template", "spec", "containers"])[0];
        for endpoint in arr(monitor, &["spec", "podMetricsEndpoints"]) {
            container_port(container, s(endpoint, &["port"]));
            assert_eq!(s(endpoint, &["path"]), "/metrics");
        }
        for label in opt(monitor, &["spec", "podTargetLabels"])
            .map(strings)
            .unwrap_or_default()
        {
            assert!(labels.contains_key(&label), "{name}: {label}");
        }
    }

    let cert = &docs(&kube_dir().join("optional/certificate.yaml"))[0];
    assert_eq!(s(cert, &["kind"]), "Certificate");
    let dep = object("Deployment", "turnpike-relay");
    let tls = named(arr(dep, &["spec", "template", "spec", "volumes"]), "tls");
    assert_eq!(
        s(cert, &["spec", "secretName"]),
        s(tls, &["secret", "secretName"])
    );
    assert_eq!(s(cert, &["metadata", "namespace"]), "turnpike");
    let svc = object("Service", "turnpike-relay");
    let hostname = s(
        svc,
        &[
            "metadata",
            "annotations",
            "external-dns.alpha.kubernetes.io/hostname",
        ],
    );
    assert!(
        strings(at(cert, &["spec", "dnsNames"]))
            .iter()
            .any(|n| n == hostname),
        "the certificate names the region's DNS name {hostname}"
    );
}

// ---------------------------------------------------------------------------------------------
// systemd

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
    ] {
        assert_eq!(one(key), value, "turnpike.service {key}=");
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

// ---------------------------------------------------------------------------------------------
// Running the binaries as the manifests and units do

/// Runs one round of `turnpike-probe` with `args` (a `watch` command line), its regions file
/// replaced by `regions` with every host on loopback (nothing answers there, quickly) and its
/// listener on an ephemeral loopback port: the flags and the file must be accepted.
fn run_probe_round(args: &[String], regions: &Path) {
    let text = std::fs::read_to_string(regions).expect("regions file");
    let local: String = text
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("host =") {
                "host = \"127.0.0.1\"".to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let local_path = regions.with_extension("local.toml");
    std::fs::write(&local_path, local).expect("write");
    let mut argv = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (a.as_str(), None),
        };
        match name {
            "--regions" | "--listen" => {
                if inline.is_none() {
                    it.next();
                }
                let value = if name == "--regions" {
                    local_path.display().to_string()
                } else {
                    "127.0.0.1:0".to_owned()
                };
                argv.push(format!("{name}={value}"));
            }
            _ => argv.push(a.clone()),
        }
    }
    argv.extend(["--rounds=1", "--samples=1", "--timeout-ms=200"].map(str::to_owned));
    let out = run(
        Command::new(probe_binary())
            .args(&argv)
            .env("TURNPIKE_LOG", "info")
            .env_remove("HTTPS_PROXY"),
        "turnpike-probe",
    );
    let text = output_text(&out);
    assert!(out.status.success(), "turnpike-probe {argv:?}:\n{text}");
    assert!(text.contains("metrics on http://127.0.0.1:"), "{text}");
    assert!(text.contains("probe round done"), "{text}");
}

/// The probe binary (the relay's tests get only their own package's binaries): the workspace
/// build, which `cargo test --workspace` has made, rebuilt here when missing or older than the
/// probe's sources.
fn probe_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let relay = common::relay_binary();
            let path = relay.parent().expect("target dir").join("turnpike-probe");
            let built = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
            let src = repo().join("client-probe/src");
            let stale = built.is_none_or(|built| {
                std::fs::read_dir(&src).expect("client-probe/src").any(|e| {
                    e.ok()
                        .and_then(|e| e.metadata().ok()?.modified().ok())
                        .is_some_and(|m| m > built)
                })
            });
            if stale {
                let status = Command::new(env!("CARGO"))
                    .args(["build", "-p", "turnpike-probe", "--bin", "turnpike-probe"])
                    .status()
                    .expect("cargo build");
                assert!(status.success(), "could not build turnpike-probe");
            }
            path
        })
        .clone()
}

fn example_config() -> toml::Table {
    std::fs::read_to_string(repo().join("config/turnpike.example.toml"))
        .expect("example config")
        .parse()
        .expect("TOML")
}

// ---------------------------------------------------------------------------------------------
// Pods: volumes on disk, environment, paths

/// Writes every ConfigMap and Secret volume of `pod` that the manifests define (examples
/// included) under `root/<volume>`, and makes a directory for the others. Returns the volume
/// directories by name.
fn materialize_volumes(pod: &Value, root: &Path) -> BTreeMap<String, PathBuf> {
    let mut dirs = BTreeMap::new();
    for v in arr(pod, &["volumes"]) {
        let name = s(v, &["name"]);
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let source = if let Some(cm) = opt(v, &["configMap", "name"]) {
            find_object("ConfigMap", str_of(cm)).and_then(|o| opt(o, &["data"]))
        } else if let Some(secret) = opt(v, &["secret", "secretName"]) {
            find_object("Secret", str_of(secret)).and_then(|o| opt(o, &["stringData"]))
        } else {
            None
        };
        if let Some(Value::Table(files)) = source {
            for (file, content) in files {
                std::fs::write(dir.join(file), str_of(content)).expect("write volume file");
            }
        }
        dirs.insert(name.to_owned(), dir);
    }
    dirs
}

/// Where `path` inside `container` lives on this machine: under the volume mounted there.
fn host_path(path: &str, container: &Value, volumes: &BTreeMap<String, PathBuf>) -> PathBuf {
    for m in arr(container, &["volumeMounts"]) {
        let mount = s(m, &["mountPath"]);
        if let Some(rest) = path.strip_prefix(mount) {
            if rest.is_empty() || rest.starts_with('/') {
                let dir = &volumes[s(m, &["name"])];
                return dir.join(rest.trim_start_matches('/'));
            }
        }
    }
    panic!(
        "{path} is on no volume of container {}",
        s(container, &["name"])
    )
}

fn mount_of<'a>(container: &'a Value, volume: &str) -> &'a str {
    let m = arr(container, &["volumeMounts"])
        .iter()
        .find(|m| s(m, &["name"]) == volume)
        .unwrap_or_else(|| panic!("{volume} is not mounted"));
    s(m, &["mountPath"])
}

/// A container's environment as the kubelet would give it: `fieldRef`s from `fields`,
/// `secretKeyRef`s from `secrets`, and values naming a mounted path mapped to this machine.
fn container_env(
    container: &Value,
    fields: &BTreeMap<&str, String>,
    secrets: &BTreeMap<(&str, &str), String>,
    volumes: &BTreeMap<String, PathBuf>,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for e in arr(container, &["env"]) {
        let name = s(e, &["name"]).to_owned();
        let value = if let Some(v) = opt(e, &["value"]) {
            let v = str_of(v);
            if v.starts_with('/') {
                host_path(v, container, volumes).display().to_string()
            } else {
                v.to_owned()
            }
        } else if let Some(f) = opt(e, &["valueFrom", "fieldRef", "fieldPath"]) {
            fields
                .get(str_of(f))
                .unwrap_or_else(|| panic!("no value for fieldRef {f}"))
                .clone()
        } else if opt(e, &["valueFrom", "secretKeyRef"]).is_some() {
            let r = at(e, &["valueFrom", "secretKeyRef"]);
            secrets
                .get(&(s(r, &["name"]), s(r, &["key"])))
                .unwrap_or_else(|| panic!("no value for secretKeyRef {r:?}"))
                .clone()
        } else {
            panic!("unsupported env source: {e:?}")
        };
        env.insert(name, value);
    }
    env
}

/// Kubernetes' `$(VAR)` expansion in arguments.
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = arg.to_owned();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    assert!(!out.contains("$("), "unexpanded variable in {arg}");
    out
}

fn container_port(container: &Value, name: &str) -> (i64, String) {
    let p = arr(container, &["ports"])
        .iter()
        .find(|p| opt(p, &["name"]).map(str_of) == Some(name))
        .unwrap_or_else(|| panic!("no port named {name}"));
    let protocol = opt(p, &["protocol"]).map_or("TCP", str_of).to_owned();
    (int(p, &["containerPort"]), protocol)
}

fn port_number(container: &Value, port: &Value) -> i64 {
    match port {
        Value::Integer(n) => *n,
        Value::String(name) => container_port(container, name).0,
        other => panic!("port {other:?}"),
    }
}

fn assert_selects(selector: &Value, labels: &toml::Table, what: &str) {
    let wanted = table(selector, &["matchLabels"]);
    assert!(!wanted.is_empty(), "{what}: empty selector");
    for (k, v) in wanted {
        assert_eq!(labels.get(k), Some(v), "{what} selects {k}");
    }
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix(&format!("{name}="))
            .map(str::to_owned)
            .or_else(|| (a == name).then(|| args.get(i + 1).cloned()).flatten())
    })
}

// ---------------------------------------------------------------------------------------------
// The relay's --check-config output (its settings' Debug form)

fn compact(s: &str) -> String {
    s.split_whitespace().collect()
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = s.find(start)? + start.len();
    let len = s[from..].find(end)?;
    Some(&s[from..from + len])
}

/// The listeners as (transport, port): `Listener{transport:Udp,addr:0.0.0.0:3478,...}`.
fn listeners(settings: &str) -> Vec<(String, i64)> {
    settings
        .split("Listener{transport:")
        .skip(1)
        .map(|l| {
            let transport = l.split(',').next().expect("transport").to_owned();
            let addr = between(l, "addr:", ",").expect("addr");
            let port = addr.rsplit(':').next().and_then(|p| p.parse().ok());
            (transport, port.expect("port"))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// systemd unit files

/// Every `Key=Value` of a unit file, in order per key (the sections do not repeat keys here).
fn unit_settings(path: &Path) -> BTreeMap<String, Vec<String>> {
    let text = std::fs::read_to_string(path).expect("unit file");
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.entry(k.to_owned()).or_default().push(v.to_owned());
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// YAML, read with PyYAML (kubernetes-validate's own parser) and handed over as TOML

const YAML_TO_TOML: &str = r#"
import json, sys
try:
    import yaml
except ImportError:
    print("NO-PYYAML")
    sys.exit(3)

def value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(
            json.dumps(str(k), ensure_ascii=False) + " = " + value(x)
            for k, x in v.items() if x is not None) + "}"
    sys.exit("unsupported YAML value: %r" % (v,))

for path in sys.argv[1:]:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    print("[[file]]")
    print("path = " + json.dumps(path))
    print("docs = " + value(docs))
"#;

/// Every YAML file under deploy/kubernetes, parsed once.
fn manifests() -> &'static BTreeMap<PathBuf, Vec<Value>> {
    static ALL: OnceLock<BTreeMap<PathBuf, Vec<Value>>> = OnceLock::new();
    ALL.get_or_init(|| {
        let files = yaml_files(&kube_dir());
        let out = run(
            Command::new("python3")
                .arg("-c")
                .arg(YAML_TO_TOML)
                .args(&files),
            INSTALL_PY,
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !text.contains("NO-PYYAML"),
            "PyYAML is missing: .ci/run must install {INSTALL_PY}"
        );
        assert!(out.status.success(), "YAML: {}", output_text(&out));
        let parsed: toml::Table = text.parse().expect("converted YAML");
        let mut all = BTreeMap::new();
        for f in parsed["file"].as_array().expect("files") {
            let docs = f["docs"].as_array().expect("docs").clone();
            all.insert(PathBuf::from(s(f, &["path"])), docs);
        }
        all
    })
}

fn docs(path: &Path) -> &'static [Value] {
    manifests()
        .get(path)
        .unwrap_or_else(|| panic!("not a manifest: {}", path.display()))
}

/// The files `kubectl apply` gets: core Kubernetes kinds, examples included.
fn applied_manifests() -> Vec<PathBuf> {
    ["relay", "probe"]
        .iter()
        .flat_map(|d| yaml_files(&kube_dir().join(d)))
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect()
}

fn find_object(kind: &str, name: &str) -> Option<&'static Value> {
    manifests().values().flatten().find(|d| {
        opt(d, &["kind"]).map(str_of) == Some(kind)
            && opt(d, &["metadata", "name"]).map(str_of) == Some(name)
    })
}

fn object(kind: &str, name: &str) -> &'static Value {
    find_object(kind, name).unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes"))
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn opt<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| match v {
        Value::Array(a) => a.get(k.parse::<usize>().ok()?),
        _ => v.get(*k),
    })
}

fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    opt(v, path).unwrap_or_else(|| panic!("missing {}", path.join(".")))
}

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    str_of(at(v, path))
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

fn int(v: &Value, path: &[&str]) -> i64 {
    at(v, path)
        .as_integer()
        .unwrap_or_else(|| panic!("{} is not an integer", path.join(".")))
}

fn boolean(v: &Value, path: &[&str]) -> bool {
    at(v, path)
        .as_bool()
        .unwrap_or_else(|| panic!("{} is not a boolean", path.join(".")))
}

fn arr<'a>(v: &'a Value, path: &[&str]) -> &'a Vec<Value> {
    at(v, path)
        .as_array()
        .unwrap_or_else(|| panic!("{} is not a list", path.join(".")))
}

fn table<'a>(v: &'a Value, path: &[&str]) -> &'a toml::Table {
    at(v, path)
        .as_table()
        .unwrap_or_else(|| panic!("{} is not a map", path.join(".")))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
        .iter()
        .map(|x| str_of(x).to_owned())
        .collect()
}

fn named<'a>(list: &'a [Value], name: &str) -> &'a Value {
    list.iter()
        .find(|x| opt(x, &["name"]).map(str_of) == Some(name))
        .unwrap_or_else(|| panic!("nothing named {name}"))
}

// ---------------------------------------------------------------------------------------------
// Plumbing

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn kube_dir() -> PathBuf {
    repo().join("deploy/kubernetes")
}

fn systemd_dir() -> PathBuf {
    repo().join("deploy/systemd")
}

/// Runs a command to completion; a missing program fails naming what `.ci/run` must install.
fn run(cmd: &mut Command, install: &str) -> Output {
    match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "{:?} is not installed: .ci/run must install {install}",
            cmd.get_program()
        ),
        Err(e) => panic!("cannot run {:?}: {e}", cmd.get_program()),
    }
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "turnpike-deploy-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
