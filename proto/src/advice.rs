//! The words Turnpike uses to tell people what a network test found and what to do about it:
//! one table that `turnpike-probe` (its firewall table, capture comments and HTML report) and
//! the relay's network test page (served to the browser as JSON) both read, so the two never
//! say the same thing differently.
//!
//! A phrase is a template: `{name}` stands for a value the caller fills in with
//! [`Phrase::say`] (or the page's `say()`).

macro_rules! phrases {
    ($($(#[$doc:meta])* $name:ident = $key:literal => $text:literal,)*) => {
        /// One phrase of the table.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Phrase {
            $($(#[$doc])* $name,)*
        }

        impl Phrase {
            /// Every phrase, in table order.
            pub const ALL: &'static [Phrase] = &[$(Phrase::$name,)*];

            /// The phrase's name in the page's table.
            pub fn key(self) -> &'static str {
                match self {
                    $(Phrase::$name => $key,)*
                }
            }

            /// The template, with its `{name}` holes.
            pub fn text(self) -> &'static str {
                match self {
                    $(Phrase::$name => $text,)*
                }
            }
        }
    };
}

phrases! {
    /// The path works.
    Open = "verdict.open" => "open",
    /// Dropped or cut on the way.
    Blocked = "verdict.blocked" => "BLOCKED on the way",
    /// A TCP reset to the connection, or ICMP port unreachable: from the host, or from a
    /// firewall that rejects; the two look the same.
    Refused = "verdict.refused" => "REFUSED: nothing listens there, or a firewall rejects",
    /// Something accepted the connection but gave no TURN answer in time.
    NotAnswering = "verdict.not_answering" => "REACHED, but no TURN answer",
    /// Something answered, and it is not a TURN relay.
    NotTurn = "verdict.not_turn" => "REACHED, but what answered is not a TURN relay",
    /// The relay answered with an error.
    RelayRefused = "verdict.relay_refused" => "open, but the relay refused",
    /// The relay's certificate is not trusted by this machine: the relay's to fix.
    Untrusted = "verdict.untrusted" => "REACHED, but the relay's certificate is not trusted here",
    /// A certificate that is not the relay's, with evidence.
    Inspected = "verdict.inspected" => "TLS INSPECTED on the way",
    /// Allocated, but relayed data did not come back.
    RelayedLost = "verdict.relayed_lost" => "open, but relayed data did not come back",
    /// The name does not resolve.
    Unknown = "verdict.unknown" => "UNKNOWN: the name does not resolve",
    /// Not probed.
    NotTested = "verdict.not_tested" => "not tested",
    /// Nothing of the host answered on any path.
    Silent = "verdict.silent" => "NO ANSWER from the host on any path: the relay is down, or everything to it is blocked",
    /// This machine could not send.
    Local = "verdict.local" => "LOCAL ERROR on this machine",
    /// The proxy given to the probe cannot be reached.
    ProxyUnreachable = "verdict.proxy_unreachable" => "the web proxy CANNOT BE REACHED",
    /// The proxy answered CONNECT with a refusal.
    ProxyRefused = "verdict.proxy_refused" => "REFUSED by the web proxy (CONNECT)",
    /// The proxy took CONNECT, but nothing answered behind it.
    BehindProxy = "verdict.behind_proxy" => "through the proxy, but the relay behind it did not answer",

    /// Throughput at or above the requirement.
    Meets = "bandwidth.meets" => "meets the requirement",
    /// Throughput below the requirement.
    MeetsNot = "bandwidth.meets_not" => "DOES NOT meet the requirement",

    FixUdp = "fix.udp" => "Allow UDP from this network to {host} port {port}, and the replies back in.",
    FixRelayPorts = "fix.relay_ports" => "Allow UDP between this network and {host} ports {ports}, both directions: peers that do not use TURN send media there.",
    FixTcp = "fix.tcp" => "Allow TCP connections from this network to {host} port {port}.",
    FixTls = "fix.tls" => "Allow TLS (TCP {port}) from this network to {host}, without TLS inspection: it is the path that passes strict firewalls.",
    FixProxy = "fix.proxy" => "The web proxy refused CONNECT to {host} port {port} ({detail}): let it open connections (CONNECT) to {host} port {port}, without TLS inspection.",
    FixProxyAuth = "fix.proxy_auth" => "The web proxy asks for credentials ({detail}): give them to the probe as --proxy http://user:password@host:port.",
    FixProxyUnreachable = "fix.proxy_unreachable" => "The web proxy given to the probe cannot be reached ({detail}): check the proxy's address (--proxy or HTTPS_PROXY) and that it runs.",
    FixBehindProxy = "fix.behind_proxy" => "The web proxy took the connection to {host} port {port}, but no relay answered behind it ({detail}): check that the relay is up and listens there (ask its operator).",
    FixInspected = "fix.inspected" => "A proxy inspects TLS to {host}: add {host} to its TLS-inspection bypass list, or TURN over TLS cannot work.",
    /// The page's own sign of inspection: the relay saw the page's HTTPS arrive re-originated.
    FixInspectedWeb = "fix.inspected_web" => "The relay saw this browser's HTTPS to {host} arrive from a TLS client that is not the browser ({detail}): a proxy on the way opens TLS, and TURN over TLS to port {port} cannot pass it. Add {host} to its TLS-inspection bypass list.",
    FixUntrusted = "fix.untrusted" => "For the operator of the relay at {host}, not for the network: {detail}.",
    FixRefused = "fix.refused" => "Nothing listens at {host} port {port}, or a firewall rejects connections to it: the two look the same from here{up}. Ask the relay's operator whether the relay listens there; if it does, a firewall on the way rejects it.",
    FixNotAnswering = "fix.not_answering" => "Something at {host} port {port} accepts connections but does not answer as a TURN relay (a proxy, or another service on that address): check the address and the proxy.",
    FixNotTurn = "fix.not_turn" => "What answers at {host} port {port} is not a TURN relay ({detail}): check the port in regions.toml, and which service runs there.",
    FixRelayRefused = "fix.relay_refused" => "The relay at {host} refused the request ({detail}): check the user name, password or shared secret. The network is open.",
    FixRelayedLost = "fix.relayed_lost" => "The relay at {host} answered on port {port}, but data relayed through it did not come back: ask the relay's operator to check its relay ports and peer policy.",
    FixSilent = "fix.silent" => "Check first that the relay at {host} is up (ask its operator): nothing answered on any path from here ({paths}). If it is up, this network blocks them all.",
    FixLocal = "fix.local" => "This machine could not send to {host} port {port} ({detail}): check its own network connection, routes and firewall first.",
    FixUnknown = "fix.unknown" => "{host} does not resolve: check the name and the DNS servers.",
    FixQuota = "fix.quota" => "{path} carried {got} Mbit/s because the relay limits each allocation to {limit} Mbit/s (its bandwidth quota, which it reported), below the {need} Mbit/s required: ask its operator to raise it. The network was not the limit.",
    FixBandwidth = "fix.bandwidth" => "{path} carried {got} of the {need} Mbit/s required ({loss}% lost): allow more bandwidth to the relay, or expect video at {video} at most.",
    /// After a fix, while another path carries calls.
    Fallback = "fix.fallback" => "Until then calls use {other}.",
    /// After a fix, when no path works.
    NoFallback = "fix.no_fallback" => "No other path works either: calls through this relay will fail.",
    FixWebSocket = "fix.websocket" => "A proxy or firewall blocks WebSocket upgrades: allow WebSocket (Upgrade) traffic to {host} port {port}.",
    FixLongPoll = "fix.long_poll" => "A proxy cuts or buffers long-held HTTP requests: exempt {host} from response buffering and short timeouts.",
    FixMedia = "fix.media" => "Allow this site to use the camera and microphone in the browser's settings, and check no other application holds them.",
    FixBusy = "fix.busy" => "The relay is busy with other tests right now: run the test again in a minute.",
    FixPageCredentials = "fix.page_credentials" => "Reload the page to get fresh test credentials; if it persists, tell the relay's operator (its clock or configuration may be wrong).",
}

impl Phrase {
    /// The template with each `{name}` replaced by its value in `args`; a hole without a value
    /// stays as it is, so a missing argument shows in the text (and fails the tests).
    pub fn say(self, args: &[(&str, &str)]) -> String {
        let text = self.text();
        let mut out = String::with_capacity(text.len() + 32);
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            match after.find('}') {
                Some(close) => {
                    let name = &after[..close];
                    match args.iter().find(|(k, _)| *k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => out.push_str(&rest[open..open + close + 2]),
                    }
                    rest = &after[close + 1..];
                }
                None => {
                    out.push_str(&rest[open..]);
                    rest = "";
                }
            }
        }
        out.push_str(rest);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_are_filled_and_missing_ones_show() {
        assert_eq!(
            Phrase::FixUdp.say(&[("host", "relay.example"), ("port", "3478")]),
            "Allow UDP from this network to relay.example port 3478, and the replies back in."
        );
        assert_eq!(
            Phrase::FixTcp.say(&[("host", "h")]),
            "Allow TCP connections from this network to h port {port}."
        );
    }

    #[test]
    fn keys_are_unique() {
        let keys: std::collections::HashSet<_> = Phrase::ALL.iter().map(|p| p.key()).collect();
        assert_eq!(keys.len(), Phrase::ALL.len());
    }
}
