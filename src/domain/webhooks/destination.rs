//! Where webhooks may be sent. An endpoint URL is the one input that makes batchd send
//! requests on a client's behalf, so it is checked like an attacker wrote it: `https`
//! only (unless allowed), no credentials in it, and no address inside the deployment's
//! own networks (loopback, private, link-local, the cloud metadata service, ...), both
//! when the endpoint is saved and at every delivery, since a name can resolve elsewhere
//! by then (DNS rebinding).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use url::Url;

use crate::error::{Error, Result};

/// Longest endpoint URL accepted.
pub const MAX_URL_CHARS: usize = 2_048;

/// What the deployment allows beyond public `https` URLs (the `--webhook-allow-*`
/// flags; tests use them to reach a local receiver).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DestinationPolicy {
    /// Let webhook endpoints be plain `http://` URLs, not only `https://`.
    pub allow_http: bool,
    /// Let webhooks reach addresses inside private, loopback and link-local networks
    /// (refused by default, when saved and at every delivery).
    pub allow_private_networks: bool,
}

impl DestinationPolicy {
    /// Checks an endpoint URL as given; `field` names it in errors. A host that is an
    /// address literal is checked here; a name is checked once resolved
    /// ([`DestinationPolicy::check_address`]).
    pub fn check_url(&self, field: &str, text: &str) -> Result<Url> {
        if text.chars().count() > MAX_URL_CHARS {
            return Err(Error::invalid(
                field,
                format!("is longer than {MAX_URL_CHARS} characters"),
            ));
        }
        let url = Url::parse(text)
            .map_err(|e| Error::invalid(field, format!("is not an absolute URL ({e})")))?;
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            "http" => {
                return Err(Error::invalid(
                    field,
                    "must be an https:// URL (this deployment does not send webhooks over plain http)",
                ));
            }
            other => {
                return Err(Error::invalid(
                    field,
                    format!(
                        "has scheme `{}`; use https://",
                        other.chars().take(20).collect::<String>()
                    ),
                ));
            }
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Error::invalid(
                field,
                "must not carry credentials; verify deliveries with the signing secret",
            ));
        }
        let host = match url.host() {
            Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
            Some(url::Host::Domain(_)) => None,
            None => return Err(Error::invalid(field, "has no host")),
        };
        if let Some(ip) = host {
            self.check_address(field, ip)?;
        }
        if url.fragment().is_some() {
            return Err(Error::invalid(field, "must not have a #fragment"));
        }
        Ok(url)
    }

    /// Refuses an address webhooks may not reach under this policy. The error names
    /// the rule, never the address: a tenant must not learn from a refusal where a
    /// name points inside the deployment (callers log the address if they need it).
    pub fn check_address(&self, field: &str, ip: IpAddr) -> Result<()> {
        if self.allow_private_networks || is_public(ip) {
            return Ok(());
        }
        Err(Error::invalid(field, NOT_PUBLIC))
    }
}

/// Why an address literal is refused: the rule, not the address.
pub const NOT_PUBLIC: &str = "is not a public address; webhooks go to public addresses only";

/// Why a name is refused, whether it resolves to no address at all, too slowly, or
/// only inside the deployment: the three are told apart by nobody outside, so that
/// refusals map no internal DNS.
pub const NOT_RESOLVING_TO_PUBLIC: &str =
    "does not resolve to a public address; webhooks go to public addresses only";

/// Whether `ip` is a public unicast address: not loopback, private, shared (CGNAT),
/// link-local (which holds the cloud metadata service, 169.254.169.254), unspecified,
/// broadcast, multicast, documentation or otherwise reserved. IPv6 is public only in
/// global unicast (2000::/3) outside its special-purpose blocks; an IPv4 address
/// translated by well-known NAT64 (64:ff9b::/96) is judged as that IPv4 address.
/// Every other form that carries or leads to an IPv4 address is refused whole:
/// IPv4-mapped (::ffff:0:0/96) and IPv4-translated (::ffff:0:0:0/96) addresses, which
/// a dual-stack socket or a SIIT translator turns into any IPv4 address, IPv4-compatible
/// (::/96), local-use NAT64 (64:ff9b:1::/48, whose embedding the operator chooses),
/// 6to4 (2002::/16) and Teredo (within 2001::/23).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            let segments = v6.segments();
            // 64:ff9b::/96, well-known NAT64: the embedded IPv4 address is what is
            // reached, and a public one is as public as itself.
            if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = segments[6].to_be_bytes();
                let [c, d] = segments[7].to_be_bytes();
                return is_public_v4(Ipv4Addr::new(a, b, c, d));
            }
            is_public_v6(v6)
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || a >= 240) // reserved
}

/// Public IPv6: inside global unicast, 2000::/3, and outside its blocks that are not
/// globally reachable or that lead to IPv4. Everything outside 2000::/3 (loopback,
/// unspecified, the IPv4-mapped, -translated and -compatible forms, local-use NAT64,
/// unique local, link-local, site-local, multicast, discard-only 100::/64, SRv6
/// 5f00::/16) is refused by the first test.
fn is_public_v6(ip: Ipv6Addr) -> bool {
    let [first, second, ..] = ip.segments();
    let global_unicast = (first & 0xe000) == 0x2000;
    let special = match first {
        // IETF protocol assignments, 2001::/23 (Teredo, ORCHID, ...), and
        // documentation, 2001:db8::/32
        0x2001 => second < 0x0200 || second == 0x0db8,
        // 6to4, 2002::/16: leads to the IPv4 address inside
        0x2002 => true,
        // documentation, 3fff::/20
        0x3fff => second < 0x1000,
        _ => false,
    };
    global_unicast && !special
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(result: Result<impl std::fmt::Debug>) -> String {
        match result.unwrap_err() {
            Error::InvalidArgument { field, .. } => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn addresses_inside_the_deployment_are_not_public() {
        for inside in [
            "127.0.0.1",
            "127.8.9.10",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "192.0.0.8",
            "198.18.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "::127.0.0.1",
            "2001:db8::1",
            // local-use NAT64, 64:ff9b:1::/48: the operator decides what it reaches
            "64:ff9b:1::a00:1",
            "64:ff9b:1:ffff::808:808",
            // 6to4, 2002::/16, with a private and with a public IPv4 address inside
            "2002:a00:1::1",
            "2002:808:808::1",
            // IPv4-mapped, ::ffff:0:0/96, whatever the IPv4 address
            "::ffff:8.8.8.8",
            "::ffff:10.0.0.1",
            // IPv4-translated (SIIT), ::ffff:0:0:0/96
            "::ffff:0:7f00:1",
            "::ffff:0:808:808",
            // Teredo and the rest of 2001::/23; documentation 3fff::/20; discard-only;
            // SRv6; outside global unicast
            "2001::1",
            "2001:1ff::1",
            "3fff::1",
            "3fff:fff::1",
            "100::1",
            "5f00::1",
            "4000::1",
        ] {
            let ip: IpAddr = inside.parse().unwrap();
            assert!(!is_public(ip), "{inside} must not be reachable");
        }
        for outside in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "2606:4700:4700::1111",
            "64:ff9b::808:808",
            "2001:200::1",
            "2001:4860:4860::8888",
            "2003::1",
            "3ffe::1",
            "3fff:1000::1",
        ] {
            let ip: IpAddr = outside.parse().unwrap();
            assert!(is_public(ip), "{outside} is public");
        }
    }

    #[test]
    fn only_public_https_urls_pass_by_default() {
        let policy = DestinationPolicy::default();
        assert!(
            policy
                .check_url("url", "https://hooks.example.com/batchd?x=1")
                .is_ok()
        );
        for bad in [
            "http://hooks.example.com/",
            "ftp://hooks.example.com/",
            "file:///etc/passwd",
            "hooks.example.com/path",
            "https://user:pass@hooks.example.com/",
            "https://127.0.0.1/",
            "https://[::1]:8443/",
            "https://10.1.2.3/",
            "https://169.254.169.254/latest/meta-data/",
            "https://[::ffff:7f00:1]/",
            "https://2130706433/",
            "https://0x7f.1/",
            "https://hooks.example.com/#frag",
            "",
            "https://\u{0}/",
        ] {
            assert_eq!(field_of(policy.check_url("url", bad)), "url", "{bad}");
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_CHARS));
        assert_eq!(field_of(policy.check_url("url", &long)), "url");
    }

    #[test]
    fn refusals_name_the_rule_never_the_address() {
        let policy = DestinationPolicy::default();
        for (url, address) in [
            ("https://127.0.0.1/", "127.0.0.1"),
            ("https://[::ffff:a00:1]/", "10.0.0.1"),
            ("https://[2002:a00:1::1]/", "2002"),
        ] {
            let error = policy.check_url("url", url).unwrap_err().to_string();
            assert!(error.contains("not a public address"), "{url}: {error}");
            assert!(!error.contains(address), "{url}: {error}");
            assert!(!error.contains("private"), "{url}: {error}");
        }
    }

    #[test]
    fn the_flags_open_http_and_private_networks() {
        let local = DestinationPolicy {
            allow_http: true,
            allow_private_networks: true,
        };
        assert!(local.check_url("url", "http://127.0.0.1:9000/hook").is_ok());
        let http_only = DestinationPolicy {
            allow_http: true,
            allow_private_networks: false,
        };
        assert!(
            http_only
                .check_url("url", "http://hooks.example.com/")
                .is_ok()
        );
        assert!(
            http_only
                .check_url("url", "http://127.0.0.1:9000/")
                .is_err()
        );
        assert!(
            http_only
                .check_address("url", "127.0.0.1".parse().unwrap())
                .is_err(),
            "a name that resolves to loopback is refused at delivery"
        );
    }
}
