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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::Args)]
pub struct DestinationPolicy {
    /// Let webhook endpoints be plain `http://` URLs, not only `https://`.
    #[arg(long = "webhook-allow-http", env = "BATCHD_WEBHOOK_ALLOW_HTTP")]
    pub allow_http: bool,
    /// Let webhooks reach addresses inside private, loopback and link-local networks
    /// (refused by default, when saved and at every delivery).
    #[arg(
        long = "webhook-allow-private-networks",
        env = "BATCHD_WEBHOOK_ALLOW_PRIVATE_NETWORKS"
    )]
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

    /// Refuses an address webhooks may not reach under this policy.
    pub fn check_address(&self, field: &str, ip: IpAddr) -> Result<()> {
        if self.allow_private_networks || is_public(ip) {
            return Ok(());
        }
        Err(Error::invalid(
            field,
            format!(
                "reaches {ip}, an address inside a private, loopback, link-local or reserved network; webhooks go to public addresses only"
            ),
        ))
    }
}

/// Whether `ip` is a public unicast address: not loopback, private, shared (CGNAT),
/// link-local (which holds the cloud metadata service, 169.254.169.254), unspecified,
/// broadcast, multicast, documentation or otherwise reserved. IPv4 addresses mapped
/// into or translated to IPv6 are judged as IPv4.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let segments = v6.segments();
            // 64:ff9b::/96, NAT64: the embedded IPv4 address is what is reached.
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

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local, fc00::/7
        || (first & 0xffc0) == 0xfe80 // link-local, fe80::/10
        || (first & 0xffc0) == 0xfec0 // site-local (deprecated), fec0::/10
        || first == 0x2001 && ip.segments()[1] == 0x0db8 // documentation
        || ip.segments()[..6] == [0, 0, 0, 0, 0, 0]) // IPv4-compatible (deprecated)
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
