//! `deploy/kubernetes/` validated offline with `kubernetes-validate --strict` and checked
//! against the real binaries: the configuration the pod renders is one the relay accepts
//! (`--check-config`), the ports and probes are the ones the relay serves, the drain fits in
//! the grace period, the probe exporter runs a round with the manifest's arguments.
//!
//! Tools, installed by `.ci/run`: `python3` with PyYAML and `kubernetes-validate` (PyPI
//! `kubernetes-validate`, which brings PyYAML). A missing tool fails the test with the package
//! to install.

mod deploy;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use deploy::common;
use deploy::*;

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
    // --check-config prints the effective configuration as TOML, its verdict as a comment.
    let effective: toml::Table = String::from_utf8_lossy(&out.stdout)
        .parse()
        .unwrap_or_else(|e| panic!("the effective configuration is TOML ({e}):\n{shown}"));
    assert!(shown.contains("configuration OK"), "{shown}");
    let strs = |v: &toml::Value| -> Vec<String> {
        v.as_array()
            .expect("an array")
            .iter()
            .map(|x| x.as_str().expect("a string").to_owned())
            .collect()
    };
    assert_eq!(
        strs(&effective["external_ips"]),
        [format!("{public_ip}/{host_ip}")],
        "advertises the node's public address for its internal one:\n{shown}"
    );
    assert_eq!(
        strs(&effective["relay_ips"]),
        [host_ip.to_string()],
        "{shown}"
    );
    assert_eq!(
        strs(&effective["auth"]["secrets"]),
        ["<hidden>", "<hidden>"],
        "both secrets from TURNPIKE_AUTH_SECRET, hidden:\n{shown}"
    );
    assert!(
        effective["auth"]["users"]
            .as_array()
            .expect("users")
            .is_empty(),
        "no static users in a fleet:\n{shown}"
    );

    assert!(
        effective["store"].get("url").is_none(),
        "no store without the Secret's store-url:\n{shown}"
    );

    // With the Secret's optional keys: the store (its password hidden), the nonce secret, and
    // the state folder on the node's disk, writable by the relay and handed to its user.
    let mut fleet_secrets = secrets.clone();
    fleet_secrets.insert(
        ("turnpike-auth", "store-url"),
        "postgres://turnpike:db-password-in-the-secret@postgres.db.svc:5432/turnpike?sslmode=verify-full".into(),
    );
    fleet_secrets.insert(
        ("turnpike-auth", "nonce-secret"),
        "fleet-nonce-key-in-the-secret".into(),
    );
    let fleet_env = container_env(relay, &fields, &fleet_secrets, &volumes);
    let out = run(
        Command::new(common::relay_binary())
            .args(&args)
            .env_clear()
            .envs(fleet_env.iter().filter(|(k, _)| k.starts_with("TURNPIKE_"))),
        "turnpike",
    );
    let fleet_shown = output_text(&out);
    assert!(out.status.success(), "turnpike {args:?}:\n{fleet_shown}");
    for secret in ["db-password-in-the-secret", "fleet-nonce-key-in-the-secret"] {
        assert!(
            !fleet_shown.contains(secret),
            "{secret} shown:\n{fleet_shown}"
        );
    }
    let fleet_effective: toml::Table = String::from_utf8_lossy(&out.stdout)
        .parse()
        .unwrap_or_else(|e| panic!("TOML ({e}):\n{fleet_shown}"));
    assert_eq!(
        fleet_effective["store"]["url"].as_str(),
        Some("postgres://turnpike@postgres.db.svc:5432/turnpike?sslmode=verify-full"),
        "{fleet_shown}"
    );
    assert_eq!(
        fleet_effective["auth"]["nonce_secret"].as_str(),
        Some("<hidden>"),
        "{fleet_shown}"
    );
    let state_dir = fleet_effective["store"]["state_dir"]
        .as_str()
        .expect("a state folder with a store");
    let state_mount = arr(relay, &["volumeMounts"])
        .iter()
        .find(|m| s(m, &["mountPath"]) == state_dir)
        .unwrap_or_else(|| panic!("{state_dir} is on no volume of the relay"));
    assert!(
        opt(state_mount, &["readOnly"]).is_none_or(|r| r.as_bool() == Some(false)),
        "the relay writes its state folder"
    );
    let state_volume = named(arr(pod, &["volumes"]), s(state_mount, &["name"]));
    assert_eq!(
        s(state_volume, &["hostPath", "path"]),
        state_dir,
        "kept on the node"
    );
    assert_eq!(s(state_volume, &["hostPath", "type"]), "DirectoryOrCreate");
    let owner = named(arr(pod, &["initContainers"]), "state-dir");
    assert_eq!(mount_of(owner, s(state_mount, &["name"])), state_dir);
    let script = str_of(&arr(owner, &["args"])[0]);
    let uid = int(pod, &["securityContext", "runAsUser"]);
    let gid = int(pod, &["securityContext", "runAsGroup"]);
    assert!(
        script.contains(&format!("chown {uid}:{gid} {state_dir}"))
            && script.contains(&format!("chmod 0700 {state_dir}")),
        "state-dir hands {state_dir} to the relay's user, private:\n{script}"
    );

    // Health and metrics: the probes and the scrape annotation point where the relay serves.
    let metrics = effective["metrics_listen"]
        .as_str()
        .expect("metrics_listen");
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
    let listeners = listeners(&strs(&effective["listen"]));
    assert!(listeners.len() >= 4, "{shown}");
    let declared: BTreeSet<(i64, String)> = arr(relay, &["ports"])
        .iter()
        .map(|p| (int(p, &["containerPort"]), s(p, &["protocol"]).to_owned()))
        .collect();
    for (transport, port) in &listeners {
        let protocol = if transport == "udp" { "UDP" } else { "TCP" };
        assert!(
            declared.contains(&(*port, protocol.to_owned())),
            "listener {transport} {port} is not a declared port: {declared:?}"
        );
    }
    for p in arr(relay, &["ports"]) {
        assert_eq!(int(p, &["hostPort"]), int(p, &["containerPort"]));
    }

    // TLS: the configured files are the kubernetes.io/tls keys of the mounted Secret.
    for (key, file) in [("cert", "tls.crt"), ("key", "tls.key")] {
        let path = effective["tls"][key].as_str().expect(key);
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
    let drain = effective["drain_grace_secs"]
        .as_integer()
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
        // One container runs as root, to give the relay its state folder, and may do only
        // that.
        if name == "state-dir" {
            assert_eq!(int(c, &["securityContext", "runAsUser"]), 0);
            assert_eq!(
                strings(at(c, &["securityContext", "capabilities", "add"])),
                ["CHOWN", "FOWNER"]
            );
        } else {
            assert!(
                opt(c, &["securityContext", "runAsUser"]).is_none(),
                "{name}"
            );
        }
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
