//! What the operator reads before and at start: `--check-config` prints the effective
//! configuration as TOML with its warnings and one verdict (a port in use, by the running relay
//! say, is a warning naming its holder), and a listener that cannot be bound is named by its
//! key, once, at start.

mod common;

use std::process::Command;

use common::{relay_binary, ConfigFile};

fn turnpike(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(relay_binary())
        .args(args)
        .env("TURNPIKE_LOG", "info")
        .output()
        .expect("run turnpike");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_effective_configuration_is_toml_with_warnings_and_a_verdict() {
    let config = ConfigFile::new(
        "check",
        r#"
listen = ["udp://127.0.0.1:0", "tcp://127.0.0.1:0"]
relay_ips = ["127.0.0.1"]
[auth]
secrets = ["abc"]
users = [{ name = "alice", password = "alice-password-value" }]
[peer]
allow = ["10.0.0.1/8"]
"#,
    );
    let (ok, stdout, stderr) = turnpike(&["--config", config.arg(), "--check-config"]);
    assert!(ok, "{stdout}{stderr}");
    let effective: toml::Table = stdout.parse().expect("the output is TOML");
    // The file's own keys, every default filled in, secrets hidden.
    assert_eq!(effective["peer"]["allow"][0].as_str(), Some("10.0.0.1/8"));
    assert_eq!(effective["auth"]["secrets"][0].as_str(), Some("<hidden>"));
    assert_eq!(
        effective["auth"]["users"][0]["password"].as_str(),
        Some("<hidden>")
    );
    assert_eq!(
        effective["tcp"]["max_connections_per_ip"].as_integer(),
        Some(64)
    );
    assert!(!stdout.contains("alice-password-value") && !stdout.contains("\"abc\""));
    assert!(
        stdout.contains("# warning: peer.allow: 10.0.0.1/8 has host bits set; it means 10.0.0.0/8"),
        "{stdout}"
    );
    assert!(
        stdout.contains("# warning: auth.secrets[0]: 3 characters"),
        "{stdout}"
    );
    let last = stdout.lines().last().expect("a verdict");
    assert_eq!(
        last,
        format!("# {}: configuration OK, with 2 warnings", config.arg())
    );
}

/// The check is made beside the running relay the edited file is for: a port in use is a
/// warning naming who holds it, not a refusal; starting still refuses, once, at its key.
#[test]
fn a_port_in_use_is_a_warning_naming_its_holder_and_refuses_a_start() {
    let relay = common::Relay::start(&[]);
    let udp = relay.udp;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let config = ConfigFile::new(
        "check-in-use",
        &format!(
            "listen = [\"udp://{udp}\", \"tcp://127.0.0.1:{port}\"]\nrelay_ips = [\"127.0.0.1\"]\n"
        ),
    );
    let (ok, stdout, stderr) = turnpike(&["--config", config.arg(), "--check-config"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "# warning: {}: key `listen[0]`: udp {udp} is in use by turnpike (pid {})",
            config.arg(),
            relay.pid()
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "key `listen[1]`: tcp 127.0.0.1:{port} is in use by check_config-"
        )) && stdout.contains(&format!("(pid {})", std::process::id())),
        "the test itself holds the TCP port:\n{stdout}"
    );
    assert!(
        stdout.contains("configuration OK, with 2 warnings"),
        "{stdout}"
    );
    // Starting says it once, with the key.
    let (ok, _, stderr) = turnpike(&["--config", config.arg()]);
    assert!(!ok);
    assert_eq!(stderr.matches("cannot bind udp").count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}: key `listen[0]`: cannot bind udp {udp}",
            config.arg()
        )),
        "{stderr}"
    );
    // A flag names its flag.
    let (ok, stdout, _) = turnpike(&[
        "--listen",
        "udp://127.0.0.1:0",
        "--listen",
        &format!("tcp://127.0.0.1:{port}"),
        "--check-config",
    ]);
    assert!(ok);
    assert!(
        stdout.contains("command line: key `--listen[1]`: tcp 127.0.0.1:"),
        "{stdout}"
    );
    drop(taken);
}

#[test]
fn an_address_of_another_machine_is_a_warning() {
    // 192.0.2.1 (documentation) is on no interface of this machine: the file may be meant
    // for another (a pod's IP), so the check warns instead of refusing.
    let config = ConfigFile::new(
        "check-elsewhere",
        "listen = [\"udp://127.0.0.1:0\"]\nrelay_ips = [\"127.0.0.1\"]\nmetrics_listen = \"192.0.2.1:9641\"\n",
    );
    let (ok, stdout, stderr) = turnpike(&["--config", config.arg(), "--check-config"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("key `metrics_listen`: 192.0.2.1:9641 is not an address of this machine"),
        "{stdout}"
    );
    assert!(
        stdout.contains("configuration OK, with 1 warning"),
        "{stdout}"
    );
}

/// `turnpike --help` names the admin commands, and `turnpike admin --help` lists them, each
/// with what it does.
#[test]
fn help_lists_the_admin_commands() {
    let (ok, stdout, _) = turnpike(&["--help"]);
    assert!(ok);
    assert!(
        stdout.contains("Usage: turnpike [OPTIONS] [COMMAND]")
            && stdout
                .lines()
                .any(|l| l.trim_start().starts_with("admin ") && l.contains("admin API")),
        "{stdout}"
    );
    let (ok, stdout, _) = turnpike(&["admin", "--help"]);
    assert!(ok, "{stdout}");
    let commands: Vec<&str> = stdout
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect();
    assert!(commands.len() >= 11, "{stdout}");
    for c in commands {
        assert!(
            c.split_whitespace().count() > 1,
            "{c:?} has no description:\n{stdout}"
        );
    }
}
