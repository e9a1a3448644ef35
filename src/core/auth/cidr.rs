//! Client address allow-lists (IPv4 and IPv6 CIDRs) per key.

use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// One allowed network. IPv4 is kept as an IPv4-mapped IPv6 address (so the stored
/// form is one integer and a prefix length); matching checks the family first, see
/// [`Cidr::contains`]. `::ffff:a.b.c.d` clients are IPv4 clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cidr {
    addr: u128,
    /// Prefix length in the 128-bit space.
    bits: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `2001:db8::/32` or a bare address (a /32 or /128). Host bits
    /// set below the prefix are an error: they usually mean a typo in the mask.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| format!("'{s}' is not an IP address or CIDR"))?;
        let (max, offset) = match ip {
            IpAddr::V4(_) => (32u8, 96u8),
            IpAddr::V6(_) => (128, 0),
        };
        let len = match len {
            None => max,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= max && !l.starts_with('+') => n,
                _ => return Err(format!("'{s}': prefix length must be 0..={max}")),
            },
        };
        let bits = len + offset;
        let addr = to_u128(ip);
        if addr & !mask(bits) != 0 {
            return Err(format!("'{s}': address has bits set beyond the /{len} prefix"));
        }
        Ok(Cidr { addr, bits })
    }

    /// Whether `ip` is in this network. Families never mix: an IPv4 CIDR (including
    /// `0.0.0.0/0`) matches IPv4 clients and IPv4-mapped IPv6 clients, an IPv6 CIDR
    /// (including `::/0`) matches only genuine IPv6 clients, even when its prefix
    /// is short enough to cover the mapped range `::ffff:0:0/96`.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let addr = to_u128(ip);
        is_v4(addr, 128) == is_v4(self.addr, self.bits) && addr & mask(self.bits) == self.addr
    }
}

/// The IPv4-mapped range `::ffff:0:0/96`, where IPv4 addresses live in our 128-bit space.
const V4_MAPPED: u128 = 0xffff << 32;

/// Whether `addr/bits` lies inside the IPv4-mapped range, i.e. is an IPv4 network.
fn is_v4(addr: u128, bits: u8) -> bool {
    bits >= 96 && addr & mask(96) == V4_MAPPED
}

fn mask(bits: u8) -> u128 {
    if bits == 0 {
        0
    } else {
        u128::MAX << (128 - bits as u32)
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// Parses Envoy's `source.address` property: `1.2.3.4:5678` or `[::1]:5678` (or a bare
/// address, to be lenient with other hosts).
pub fn parse_peer(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    s.rsplit_once(':')?.0.parse().ok()
}

/// The address an anonymous client is limited under: itself for IPv4, its /64 for
/// IPv6, since one subscriber usually gets a whole /64 and could otherwise rotate
/// addresses to dodge the limit (and create one shared-data entry per address).
pub fn limit_subject(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64)))
        }
        IpAddr::V6(v6) => IpAddr::V4(v6.to_ipv4_mapped().expect("checked")),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v4_and_v6() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains(ip("10.1.255.3")));
        assert!(!c.contains(ip("10.2.0.1")));
        assert!(c.contains(ip("::ffff:10.1.2.3")));
        let c6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(c6.contains(ip("2001:db8:1::5")));
        assert!(!c6.contains(ip("2001:db9::1")));
        assert!(!c6.contains(ip("10.1.2.3")));
        assert!(Cidr::parse("127.0.0.1").unwrap().contains(ip("127.0.0.1")));
        assert!(!Cidr::parse("127.0.0.1").unwrap().contains(ip("127.0.0.2")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(!Cidr::parse("0.0.0.0/0").unwrap().contains(ip("::1")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("::1")));
    }

    /// Each CIDR matches clients of its own family only: `0.0.0.0/0` is every IPv4
    /// client (also seen as `::ffff:a.b.c.d` on dual-stack listeners), `::/0` every
    /// IPv6 client and no IPv4 one. A CIDR inside `::ffff:0:0/96` is an IPv4 CIDR.
    #[test]
    fn families_are_matched_as_documented() {
        let any4 = Cidr::parse("0.0.0.0/0").unwrap();
        let any6 = Cidr::parse("::/0").unwrap();
        for v4 in ["8.8.8.8", "127.0.0.1", "::ffff:10.1.2.3", "0.0.0.0"] {
            assert!(any4.contains(ip(v4)), "0.0.0.0/0 must admit {v4}");
            assert!(!any6.contains(ip(v4)), "::/0 must not admit IPv4 {v4}");
        }
        for v6 in ["::1", "2001:db8::1", "::", "fe80::1", "::1.2.3.4"] {
            assert!(any6.contains(ip(v6)), "::/0 must admit {v6}");
            assert!(!any4.contains(ip(v6)), "0.0.0.0/0 must not admit IPv6 {v6}");
        }
        // Short IPv6 prefixes that cover the mapped range do not reach IPv4 clients.
        assert!(!Cidr::parse("::/64").unwrap().contains(ip("10.1.2.3")));
        assert!(!Cidr::parse("::/8").unwrap().contains(ip("::ffff:10.1.2.3")));
        // Mapped notation is the IPv4 CIDR it spells.
        let mapped = Cidr::parse("::ffff:10.0.0.0/104").unwrap();
        assert_eq!(mapped, Cidr::parse("10.0.0.0/8").unwrap());
        assert!(mapped.contains(ip("10.9.9.9")) && !mapped.contains(ip("11.0.0.1")));
        assert!(Cidr::parse("::ffff:0:0/96").unwrap().contains(ip("1.2.3.4")));
        assert!(!Cidr::parse("::ffff:0:0/96").unwrap().contains(ip("::1")));
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0.1/8",
            "::1/129",
            "abc",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "1.2.3.4/-1",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn anonymous_limit_subjects() {
        assert_eq!(limit_subject(ip("10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(limit_subject(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            limit_subject(ip("2001:db8:1:2:ffff::9")),
            limit_subject(ip("2001:db8:1:2::1"))
        );
        assert_eq!(limit_subject(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
    }

    #[test]
    fn peers() {
        assert_eq!(parse_peer("1.2.3.4:80"), Some(ip("1.2.3.4")));
        assert_eq!(parse_peer("[::1]:80"), Some(ip("::1")));
        assert_eq!(parse_peer("::1"), Some(ip("::1")));
        assert_eq!(parse_peer("garbage"), None);
    }
}
