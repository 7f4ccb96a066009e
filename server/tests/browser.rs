//! Headless Chromium opens a relay-only WebRTC data channel through the relay over UDP, TCP,
//! TLS on 5349 and TLS on 443, in a network namespace the test creates; HTTPS answers on the
//! same 443. Needs root (unshare), Debian's chromium and `npm ci` in tests/browser (.ci/run).

mod common;

use common::{run_tool, TestCert};

#[test]
fn chromium_relay_only_data_channels_over_every_transport() {
    let cert = TestCert::new("browser", &["turn.test", "10.99.0.1", "127.0.0.1"]);
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    assert!(
        std::path::Path::new(&format!(
            "{root}/tests/browser/node_modules/playwright-core"
        ))
        .exists(),
        "run `npm ci` in tests/browser (.ci/run does)"
    );
    let out = run_tool(
        "unshare",
        &[
            "--net",
            "--fork",
            &format!("{root}/tests/browser/run-in-netns.sh"),
            env!("CARGO_BIN_EXE_turnpike"),
            cert.cert.to_str().expect("path"),
            cert.key.to_str().expect("path"),
        ],
        180,
    );
    assert!(out.contains("healthz: ok"), "HTTPS on 443:\n{out}");
    // The page's results (the relay's session records are JSON lines too).
    let results: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with('{') && !l.starts_with("{\"record\":\"session\""))
        .collect();
    assert_eq!(results.len(), 5, "{out}");
    for (line, protocol) in results[..4].iter().zip(["udp", "tcp", "tls", "tls"]) {
        assert!(
            line.contains("\"open\":true") && line.contains("\"echo\":\"echo:hello\""),
            "{line}"
        );
        let pair = format!(
            "{{\"local\":\"relay\",\"remote\":\"relay\",\"relayProtocol\":\"{protocol}\"}}"
        );
        assert_eq!(
            line.matches(&pair).count(),
            2,
            "both ends relay candidates over {protocol}: {line}"
        );
    }
    let refused = results[4];
    assert!(
        refused.contains("\"open\":false") && refused.contains("401"),
        "{refused}"
    );
}

/// Chromium (libwebrtc) follows a 300 Try Alternate: given only a draining relay's URL, its
/// relay candidates come from the sibling the relay names, and the data channel opens.
#[test]
fn chromium_follows_a_draining_relays_300_to_its_sibling() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = run_tool(
        "unshare",
        &[
            "--net",
            "--fork",
            &format!("{root}/tests/browser/redirect-in-netns.sh"),
            env!("CARGO_BIN_EXE_turnpike"),
        ],
        180,
    );
    let result = out
        .lines()
        .find(|l| l.starts_with("{\"url\""))
        .unwrap_or_else(|| panic!("no result:\n{out}"));
    assert!(
        result.contains("\"open\":true") && result.contains("\"echo\":\"echo:hello\""),
        "{out}"
    );
    let count = |who: &str| -> f64 {
        out.lines()
            .find_map(|l| {
                l.strip_prefix(&format!("{who}-allocations: ")).or_else(|| {
                    (who == "a-before")
                        .then(|| l.strip_prefix("a-before: "))
                        .flatten()
                })
            })
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    // The sibling made Chromium's two allocations; the draining relay none after it drained
    // (before, it made the holder's).
    assert_eq!(count("b"), 2.0, "{out}");
    assert_eq!(count("a"), count("a-before"), "{out}");
}
