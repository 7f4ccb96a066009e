//! What the deployment tests share: the manifests read with PyYAML, pods' volumes and
//! environment on disk, running the real binaries as the manifests and units do, unit files.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use toml::Value;

#[path = "../common/mod.rs"]
pub mod common;

/// Kubernetes versions the manifests are validated against: the oldest they need (the preStop
/// `sleep` action is on by default from 1.30) and a recent one.
pub const K8S_VERSIONS: [&str; 2] = ["1.30.0", "1.33.0"];
/// Highest `systemd-analyze security` exposure accepted (systemd 252 rates the relay 1.4 and the
/// probe 1.1, both "OK").
pub const MAX_EXPOSURE: f64 = 2.5;

pub const INSTALL_PY: &str =
    "PyPI kubernetes-validate, which brings PyYAML: python3 -m pip install 'kubernetes-validate==1.37.0'";
pub const INSTALL_SYSTEMD: &str =
    "Debian systemd (systemd-analyze, systemd-sysusers): apt-get install systemd";

// ---------------------------------------------------------------------------------------------
// Running the binaries as the manifests and units do

/// Runs one round of `turnpike-probe` with `args` (a `watch` command line), its regions file
/// replaced by `regions` with every host on loopback (nothing answers there, quickly) and its
/// listener on an ephemeral loopback port: the flags and the file must be accepted.
pub fn run_probe_round(args: &[String], regions: &Path) {
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
pub fn probe_binary() -> PathBuf {
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

pub fn example_config() -> toml::Table {
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
pub fn materialize_volumes(pod: &Value, root: &Path) -> BTreeMap<String, PathBuf> {
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
pub fn host_path(path: &str, container: &Value, volumes: &BTreeMap<String, PathBuf>) -> PathBuf {
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

pub fn mount_of<'a>(container: &'a Value, volume: &str) -> &'a str {
    let m = arr(container, &["volumeMounts"])
        .iter()
        .find(|m| s(m, &["name"]) == volume)
        .unwrap_or_else(|| panic!("{volume} is not mounted"));
    s(m, &["mountPath"])
}

/// A container's environment as the kubelet would give it: `fieldRef`s from `fields`,
/// `secretKeyRef`s from `secrets`, and values naming a mounted path mapped to this machine.
pub fn container_env(
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
            match secrets.get(&(s(r, &["name"]), s(r, &["key"]))) {
                Some(v) => v.clone(),
                // An optional key that is absent: Kubernetes leaves the variable unset.
                None if opt(r, &["optional"]).is_some_and(|o| o.as_bool() == Some(true)) => {
                    continue
                }
                None => panic!("no value for secretKeyRef {r:?}"),
            }
        } else {
            panic!("unsupported env source: {e:?}")
        };
        env.insert(name, value);
    }
    env
}

/// Kubernetes' `$(VAR)` expansion in arguments.
pub fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = arg.to_owned();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    assert!(!out.contains("$("), "unexpanded variable in {arg}");
    out
}

pub fn container_port(container: &Value, name: &str) -> (i64, String) {
    let p = arr(container, &["ports"])
        .iter()
        .find(|p| opt(p, &["name"]).map(str_of) == Some(name))
        .unwrap_or_else(|| panic!("no port named {name}"));
    let protocol = opt(p, &["protocol"]).map_or("TCP", str_of).to_owned();
    (int(p, &["containerPort"]), protocol)
}

pub fn port_number(container: &Value, port: &Value) -> i64 {
    match port {
        Value::Integer(n) => *n,
        Value::String(name) => container_port(container, name).0,
        other => panic!("port {other:?}"),
    }
}

pub fn assert_selects(selector: &Value, labels: &toml::Table, what: &str) {
    let wanted = table(selector, &["matchLabels"]);
    assert!(!wanted.is_empty(), "{what}: empty selector");
    for (k, v) in wanted {
        assert_eq!(labels.get(k), Some(v), "{what} selects {k}");
    }
}

pub fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix(&format!("{name}="))
            .map(str::to_owned)
            .or_else(|| (a == name).then(|| args.get(i + 1).cloned()).flatten())
    })
}

// ---------------------------------------------------------------------------------------------
/// The listeners as (transport, port), from the `listen` URLs: `udp://0.0.0.0:3478`.
pub fn listeners(urls: &[String]) -> Vec<(String, i64)> {
    urls.iter()
        .map(|u| {
            let (transport, rest) = u.split_once("://").expect("URL");
            let addr = rest.split('?').next().expect("address");
            let port = addr.rsplit(':').next().and_then(|p| p.parse().ok());
            (transport.to_owned(), port.expect("port"))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// systemd unit files

/// Every `Key=Value` of a unit file, in order per key (the sections do not repeat keys here).
pub fn unit_settings(path: &Path) -> BTreeMap<String, Vec<String>> {
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
pub fn manifests() -> &'static BTreeMap<PathBuf, Vec<Value>> {
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

pub fn docs(path: &Path) -> &'static [Value] {
    manifests()
        .get(path)
        .unwrap_or_else(|| panic!("not a manifest: {}", path.display()))
}

/// The files `kubectl apply` gets: core Kubernetes kinds, examples included.
pub fn applied_manifests() -> Vec<PathBuf> {
    ["relay", "probe"]
        .iter()
        .flat_map(|d| yaml_files(&kube_dir().join(d)))
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect()
}

pub fn find_object(kind: &str, name: &str) -> Option<&'static Value> {
    manifests().values().flatten().find(|d| {
        opt(d, &["kind"]).map(str_of) == Some(kind)
            && opt(d, &["metadata", "name"]).map(str_of) == Some(name)
    })
}

pub fn object(kind: &str, name: &str) -> &'static Value {
    find_object(kind, name).unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes"))
}

pub fn yaml_files(dir: &Path) -> Vec<PathBuf> {
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

pub fn opt<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| match v {
        Value::Array(a) => a.get(k.parse::<usize>().ok()?),
        _ => v.get(*k),
    })
}

pub fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    opt(v, path).unwrap_or_else(|| panic!("missing {}", path.join(".")))
}

pub fn s<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    str_of(at(v, path))
}

pub fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

pub fn int(v: &Value, path: &[&str]) -> i64 {
    at(v, path)
        .as_integer()
        .unwrap_or_else(|| panic!("{} is not an integer", path.join(".")))
}

pub fn boolean(v: &Value, path: &[&str]) -> bool {
    at(v, path)
        .as_bool()
        .unwrap_or_else(|| panic!("{} is not a boolean", path.join(".")))
}

pub fn arr<'a>(v: &'a Value, path: &[&str]) -> &'a Vec<Value> {
    at(v, path)
        .as_array()
        .unwrap_or_else(|| panic!("{} is not a list", path.join(".")))
}

pub fn table<'a>(v: &'a Value, path: &[&str]) -> &'a toml::Table {
    at(v, path)
        .as_table()
        .unwrap_or_else(|| panic!("{} is not a map", path.join(".")))
}

pub fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
        .iter()
        .map(|x| str_of(x).to_owned())
        .collect()
}

pub fn named<'a>(list: &'a [Value], name: &str) -> &'a Value {
    list.iter()
        .find(|x| opt(x, &["name"]).map(str_of) == Some(name))
        .unwrap_or_else(|| panic!("nothing named {name}"))
}

// ---------------------------------------------------------------------------------------------
// Plumbing

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn kube_dir() -> PathBuf {
    repo().join("deploy/kubernetes")
}

pub fn systemd_dir() -> PathBuf {
    repo().join("deploy/systemd")
}

/// Runs a command to completion; a missing program fails naming what `.ci/run` must install.
pub fn run(cmd: &mut Command, install: &str) -> Output {
    match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "{:?} is not installed: .ci/run must install {install}",
            cmd.get_program()
        ),
        Err(e) => panic!("cannot run {:?}: {e}", cmd.get_program()),
    }
}

pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
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

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
